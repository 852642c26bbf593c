"""The logical-axis sharding hook: logical axis names → ``PartitionSpec`` with a rule table, and
the activation constraint the model calls at every layer boundary.

Parameters and activations are named with logical axes (``'batch'``, ``'embed'``, ``'heads'``, …);
``pythia_jax.sharding`` holds the rule tables that map them to mesh axes. Without an active rule
context and mesh every constraint is a no-op, so the model runs unchanged on one device.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax.core import spmd as core_spmd

LogicalNames = Sequence[str | tuple[str, ...] | None]


def logical_to_mesh_spec(names: LogicalNames, rules: Sequence[tuple[str, object]]) -> jax.sharding.PartitionSpec:
    """Translate logical axis names to a ``PartitionSpec`` with a rule table.

    ``rules`` is a sequence of ``(logical_name, mesh_axes)`` pairs (``mesh_axes``: a mesh axis
    name, a tuple of them, or None), as in ``flax.linen.logical_axis_rules``. The first rule for a
    name whose mesh axes are still unused wins; a name without a usable rule is unsharded. An entry
    of ``names`` may be a tuple of logical names (a flattened dimension such as batch·length): its
    mesh axes are concatenated.
    """
    used: set[str] = set()

    def lookup(name: str) -> tuple[str, ...]:
        for logical, mesh_axes in rules:
            if logical != name:
                continue
            axes = () if mesh_axes is None else (
                (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
            if used.intersection(axes):
                continue
            used.update(axes)
            return axes
        return ()

    spec = []
    for entry in names:
        if entry is None:
            spec.append(None)
            continue
        group = (entry,) if isinstance(entry, str) else tuple(entry)
        axes: tuple[str, ...] = ()
        for name in group:
            axes += lookup(name)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return jax.sharding.PartitionSpec(*spec)


def with_logical_constraint(x: jax.Array, names: LogicalNames) -> jax.Array:
    """Constrain the sharding of activation ``x`` by logical axis names.

    A no-op unless both a logical rule context (``flax.nnx.logical_axis_rules`` /
    ``flax.linen.logical_axis_rules``) and a mesh (``jax.set_mesh`` / ``jax.sharding.use_mesh``)
    are active, so the model runs unchanged on one device.
    """
    rules = core_spmd.get_logical_axis_rules()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"logical names {tuple(names)} do not match an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(names, rules))
