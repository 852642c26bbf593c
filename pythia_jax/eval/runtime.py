"""Placing a model for evaluation, the way training does: a device mesh, parameters laid out by the
logical-axis rule table of ``pythia_jax.sharding`` (replicated under pure data parallelism) and the
batch axis split over the data axes. Jitted evaluation functions rebuild the model from the pure
parameter dict with ``model_from_params``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pythia_jax.errors import PythiaJaxError
from pythia_jax.mesh_config import MeshConfig
from pythia_jax.sharding import DEFAULT_RULES, batch_sharding, data_shards, make_mesh, param_shardings, replicated


@dataclasses.dataclass
class PlacedModel:
    """Parameters (the pure dict of ``pythia_jax.model``) placed on ``mesh`` plus how to place batches.

    ``num_shards``: into how many pieces the batch axis is split; batch sizes are rounded up to a
    multiple of it.
    """

    config: Any
    params: Any
    mesh: Mesh
    rules: Sequence[tuple[str, Any]] | None = None

    @property
    def num_shards(self) -> int:
        if self.rules is None:
            return int(self.mesh.devices.size)
        return data_shards(self.mesh, self.rules)

    def batch_sharding(self, ndim: int) -> NamedSharding:
        if self.rules is None:
            return NamedSharding(self.mesh, P(tuple(self.mesh.axis_names), *([None] * (ndim - 1))))
        return batch_sharding(self.mesh, self.rules, extra_dims=ndim - 1)

    def put_batch(self, array: np.ndarray) -> jax.Array:
        """Place a host array [batch, ...] with its batch axis split over the data axes."""
        return jax.device_put(array, self.batch_sharding(array.ndim))

    def round_batch(self, batch_size: int) -> int:
        n = self.num_shards
        return max(n, -(-int(batch_size) // n) * n)

    def replace_params(self, params: Any, config: Any = None) -> None:
        """Swap in another checkpoint of the same architecture with the same layout (the jitted
        evaluation functions, which take params as an argument, are reused without recompiling)."""
        if config is not None and config.replace(name=self.config.name) != self.config:
            raise PythiaJaxError(f"model {config.name} differs from {self.config.name}; "
                                 f"cannot reuse the placement")
        shardings = jax.tree.map(lambda a: a.sharding, self.params)
        self.params = jax.device_put(params, shardings)

    def build(self, params: Any) -> Any:
        """A ``GPTNeoX`` around (possibly traced) ``params``; call inside jit."""
        from pythia_jax.model import model_from_params
        return model_from_params(self.config, params)


def place_model(model: Any, mesh: Mesh | None = None, rules: Sequence[tuple[str, Any]] | None = None,
                *, config: Any = None, devices: Sequence[jax.Device] | None = None) -> PlacedModel:
    """Put a ``GPTNeoX`` (or, with ``config``, a pure params dict) on ``mesh``.

    Default: all devices on the ``data`` axis, the project's default rule table (parameters
    replicated, batch split).
    """
    if config is None:
        from pythia_jax.model import params_to_dict
        config, params = model.config, params_to_dict(model)
    else:
        params = model
    if mesh is None:
        mesh = make_mesh(MeshConfig(data=-1), devices)
        rules = rules if rules is not None else DEFAULT_RULES
    if rules is None:
        params = jax.device_put(params, replicated(mesh))
    else:
        params = jax.device_put(params, param_shardings(config, mesh, rules))
    return PlacedModel(config=config, params=params, mesh=mesh, rules=rules)


def next_bucket(length: int, minimum: int, maximum: int) -> int:
    """The smallest bucket >= ``length`` (at least ``minimum``, capped at ``maximum``).

    Buckets are powers of two and 1.5x powers of two (…, 64, 96, 128, 192, 256, 384, …): at most
    a third of a batch is padding, and a task compiles about two shapes per doubling of length.
    """
    length = max(int(length), int(minimum), 1)
    p = 1 << (length - 1).bit_length()  # power of two >= length
    b = p if p < 4 or (3 * p) // 4 < length else (3 * p) // 4
    return min(b, maximum)
