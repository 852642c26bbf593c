"""Device mesh, logical-axis rules and the ``NamedSharding``s of parameters, optimizer state and batches.

Mesh axes, outermost first::

    slice   data parallel across TPU slices (DCN); built with mesh_utils.create_hybrid_device_mesh
    data    data parallel (parameters replicated)
    fsdp    data parallel with parameters + optimizer state sharded (ZeRO-3) on their 'embed' dim
    tensor  Megatron tensor parallel: QKV/MLP-in columns, attention-out/MLP-out rows, vocab

The model names every parameter dimension with a logical axis (``model.logical_axes(config)``):
'vocab', 'embed', 'heads', 'mlp', 'layers', 'norm'; activations use 'batch', 'length', 'embed',
'heads', 'kv', 'vocab'. ``DEFAULT_RULES`` maps them to mesh axes; a mesh axis already used by an
earlier dimension of the same array is skipped (so activations [batch, length, embed] shard batch on
(slice, data, fsdp) and leave embed whole). Pure DP, FSDP and TP are all the same rule table with
different mesh sizes. Every check here raises ``ConfigError`` before any compute.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.mesh_config import MeshConfig  # re-exported: sharding.MeshConfig

MESH_AXES = ("slice", "data", "fsdp", "tensor")
BATCH_AXES = ("slice", "data", "fsdp")

# logical name -> mesh axis / axes / None (replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("layers", None),
    ("norm", None),
    ("length", None),
    ("kv", None),
    ("head_dim", None),
)

Rules = Sequence[tuple[str, Any]]


# ------------------------------------------------------------------------------------------- mesh
def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Sizes of the four mesh axes for ``num_devices``; fills the one -1. Raises ConfigError."""
    sizes = {"slice": cfg.slices, "data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {', '.join(free)} = -1")
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v <= 0):
            raise ConfigError(f"mesh axis {k} must be a positive integer or -1, got {v!r}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % known:
            raise ConfigError(
                f"mesh {_fmt(sizes)} does not divide the {num_devices} devices "
                f"(the fixed axes multiply to {known})")
        sizes[free[0]] = num_devices // known
    elif known != num_devices:
        raise ConfigError(f"mesh {_fmt(sizes)} has {known} devices but {num_devices} are available; "
                          f"set one axis to -1 or make the sizes multiply to {num_devices}")
    return sizes


def _fmt(sizes: Mapping[str, int]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in sizes.items()) + ")"


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``MESH_AXES`` over ``devices`` (default: all devices of all processes).

    With ``slices > 1`` on real multi-slice TPU (devices carry ``slice_index``) the slice axis runs over
    DCN via ``create_hybrid_device_mesh``; elsewhere (CPU simulation) devices are split into
    ``slices`` contiguous groups.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    from jax.experimental import mesh_utils

    if sizes["slice"] > 1 and hasattr(devices[0], "slice_index"):
        num_slices = len({d.slice_index for d in devices})
        if num_slices != sizes["slice"]:
            raise ConfigError(f"MeshConfig.slices = {sizes['slice']} but the devices span {num_slices} slices")
        ici = (1,) + shape[1:]
        dcn = (sizes["slice"], 1, 1, 1)
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            device_array = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def mesh_axis_size(mesh: Mesh, axes: Any) -> int:
    """Number of shards a dimension mapped to ``axes`` (None / name / tuple of names) is split into."""
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


# ------------------------------------------------------------------------------------------ rules
def make_rules(overrides: Rules = ()) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with ``overrides`` (pairs) replacing entries of the same logical name."""
    table = dict(DEFAULT_RULES)
    for entry in overrides:
        if len(entry) != 2:
            raise ConfigError(f"a logical-axis rule must be a (name, mesh axes) pair, got {entry!r}")
        name, axes = entry
        for a in (axes,) if isinstance(axes, str) or axes is None else tuple(axes):
            if a is not None and a not in MESH_AXES:
                raise ConfigError(f"rule for {name!r} names unknown mesh axis {a!r}; mesh axes: {MESH_AXES}")
        table[name] = tuple(axes) if isinstance(axes, list) else axes
    return tuple(table.items())


def logical_to_spec(names: Sequence[Any], rules: Rules = DEFAULT_RULES) -> P:
    """``PartitionSpec`` for one array whose dims have logical ``names`` (an entry may be a tuple of
    names for a flattened dimension, or None).

    Resolution is the model's (``layers.logical_to_mesh_spec``): the first rule of a name whose mesh
    axes are all still unused in this array wins, otherwise the dimension is not sharded.
    """
    from pythia_jax.layers import logical_to_mesh_spec

    known = {name for name, _ in rules}
    for entry in names:
        for name in (entry,) if isinstance(entry, str) else (entry or ()):
            if name not in known:
                raise ConfigError(f"no sharding rule for logical axis {name!r}; known: {sorted(known)}")
    return logical_to_mesh_spec(names, rules)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def param_specs(config: ModelConfig, rules: Rules = DEFAULT_RULES) -> dict:
    """PartitionSpec tree for the model parameters (the pure dict of ``model.abstract_params``)."""
    from pythia_jax.model import logical_axes

    return jax.tree.map(lambda names: logical_to_spec(names, rules), logical_axes(config), is_leaf=_is_names)


def check_param_divisibility(config: ModelConfig, mesh: Mesh, specs: Any) -> None:
    """ConfigError naming the first parameter whose dimension does not split evenly."""
    from pythia_jax.model import abstract_params

    tensor = mesh.shape["tensor"]
    if config.num_heads % tensor:
        raise ConfigError(f"num_heads {config.num_heads} is not divisible by the tensor-parallel size {tensor}")
    shapes = abstract_params(config)
    flat_shapes = dict(jax.tree_util.tree_leaves_with_path(shapes))
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    for path, spec in flat_specs:
        shape = flat_shapes[path].shape
        for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
            n = mesh_axis_size(mesh, axes)
            if size % n:
                raise ConfigError(
                    f"parameter {jax.tree_util.keystr(path)} dim {dim} (size {size}) is not divisible by "
                    f"its {n} shards over mesh axes {axes}; change the mesh or the model size")


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """``NamedSharding`` tree for the params; checks divisibility first."""
    specs = param_specs(config, rules)
    check_param_divisibility(config, mesh, specs)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(optimizer, params_abstract: Any, param_sharding_tree: Any, mesh: Mesh) -> Any:
    """Shardings of ``optimizer.init(params)``: per-parameter leaves (Adam mu/nu) like their parameter,
    everything else (counts, scalars) replicated."""
    import optax

    abstract_state = jax.eval_shape(optimizer.init, params_abstract)
    return optax.tree_map_params(optimizer, lambda _p, s: s, abstract_state, param_sharding_tree,
                                 transform_non_params=lambda _: replicated(mesh))


# ---------------------------------------------------------------------------------------- batches
def batch_spec(rules: Rules = DEFAULT_RULES, extra_dims: int = 1) -> P:
    """Spec of a batch array [batch, ...]: batch over the data axes, the rest whole."""
    return P(*(tuple(logical_to_spec(("batch",), rules)) + (None,) * extra_dims))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, extra_dims: int = 1) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(rules, extra_dims))


def data_shards(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """Into how many pieces the batch dimension is split."""
    return mesh_axis_size(mesh, tuple(logical_to_spec(("batch",), rules))[0])


def check_batch(global_batch: int, micro_batches: int, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
    """ConfigError unless each micro-batch splits evenly over the data shards."""
    shards = data_shards(mesh, rules)
    if global_batch % micro_batches:
        raise ConfigError(f"global batch {global_batch} is not divisible by micro_batches {micro_batches}")
    micro = global_batch // micro_batches
    if micro % shards:
        raise ConfigError(
            f"batch {micro} (global batch {global_batch} / {micro_batches} micro-batches) is not divisible "
            f"by the {shards} data shards of mesh {dict(mesh.shape)}")
