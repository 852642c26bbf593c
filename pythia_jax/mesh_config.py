"""``MeshConfig``: the device mesh of a run, as plain settings (no JAX import).

It sits below both ``pythia_jax.sharding`` (which builds the mesh from it) and
``pythia_jax.train.config`` (which holds it in ``TrainConfig.mesh``); both re-export it.
"""

from __future__ import annotations

import dataclasses

from pythia_jax.config import check_field_types


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``(slice, data, fsdp, tensor)``. One of data/fsdp/tensor may be -1 (takes the rest).

    slices: data-parallel replicas across TPU slices (DCN); 1 on a single slice / GPU host / CPU.
    data: pure data parallelism (parameters replicated).
    fsdp: ZeRO-3 style: batch split AND parameters/optimizer state sharded on their 'embed' dimension.
    tensor: Megatron tensor parallelism (heads, MLP and vocab columns).
    rules: extra (logical name, mesh axis or axes or None) pairs that override the default table
      in ``pythia_jax.sharding.DEFAULT_RULES``.
    """
    slices: int = 1
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple = ()

    def __post_init__(self) -> None:
        check_field_types(self)  # the sizes' ranges are checked by TrainConfig and sharding
