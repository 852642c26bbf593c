"""The package's layering: no module imports from a layer above its own, and no import cycles.

Every ``import`` / ``from … import`` of every module in ``pythia_jax/`` is read with ``ast``, at
module level and inside functions alike (a lazy import is still a dependency). Imports inside a
package's own modules (``pythia_jax.train.loop`` -> ``pythia_jax.train.config``) are free of the
layer rule but count for the cycle check. ``pythia_jax.cli`` loads the command modules by name
(``importlib``), which this scan does not see; they are above it anyway.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pythia_jax"

# Lowest first. A module may import from its own layer and the layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),                                  # the exception hierarchy, imports nothing
    ("config", "hf_config"),                      # ModelConfig, presets, the HF config.json fields
    ("io_utils", "host_memory", "mesh_config", "process_env"),  # file/host/process helpers, MeshConfig
    ("layers",),                                  # building blocks: modules, rotary, attention, loss
    ("model",),                                   # GPTNeoX, its parameter tree, the KV cache
    ("sharding",),                                # mesh and NamedShardings of params / batches
    ("data",),                                    # indexed datasets, Pythia's data order, grain
    ("checkpoint",),                              # Orbax checkpoints of this project
    ("convert",),                                 # HF / GPT-NeoX converters, model sources
    ("train",),                                   # training loop, optimizer, continuation
    ("eval",),                                    # evaluation on checkpoints
    ("analysis",),                                # studies over runs and checkpoints
    ("api",),                                     # init / load / save_hf
    ("__init__",),                                # the package facade (pythia_jax.init, …)
    ("gin_setup",),                               # gin at the edge: registers the configs
    ("commands",),                                # one module per CLI command
    ("cli",),                                     # argument parsing, error display
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ``pythia_jax`` that an imported name lives in (longest existing prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """``[(imported pythia_jax module, line)]`` of every import statement in the file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from pythia_jax import checkpoint" imports the submodule, "… import __version__" the package
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name) if name.split(".")[0] == "pythia_jax" else None
            if target is not None and target != module:
                found.append((target, node.lineno))
    return found


def _component(module: str) -> str:
    """The layer unit of a module: its first name under ``pythia_jax`` (``__init__`` for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_module_is_in_a_layer():
    unknown = sorted({_component(m) for m in MODULES} - set(LAYER_OF))
    assert not unknown, f"add these to LAYERS in tests/test_layering.py: {unknown}"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for module, imports in GRAPH.items():
        own = _component(module)
        for target, line in imports:
            other = _component(target)
            if other != own and LAYER_OF[other] > LAYER_OF[own]:
                upward.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {module} "
                              f"({own}, layer {LAYER_OF[own]}) imports {target} ({other}, "
                              f"layer {LAYER_OF[other]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph (a list of nodes, first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_of_the_subpackages_is_acyclic():
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for module, imports in GRAPH.items():
        for target, _ in imports:
            if _component(target) != _component(module):
                edges[_component(module)].add(_component(target))
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_the_import_graph_of_the_modules_is_acyclic():
    """Also within a package (a package's ``__init__`` re-exporting its own modules is not an edge
    back from them)."""
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for module, imports in GRAPH.items():
        for target, _ in imports:
            if not module.startswith(target + "."):
                edges[module].add(target)
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_the_scan_sees_lazy_and_relative_imports():
    """The scanner itself: a function-level import counts, ``from pythia_jax import x`` resolves
    to the submodule, and a known upward import would be reported."""
    lazy = [t for t, _ in GRAPH["pythia_jax.convert.sources"]]  # all inside functions there
    assert "pythia_jax.checkpoint" in lazy and "pythia_jax.convert.neox" in lazy
    assert _resolve("pythia_jax.checkpoint.TrainCheckpointer") == "pythia_jax.checkpoint"
    assert _resolve("pythia_jax.__version__") == "pythia_jax"
    assert _component("pythia_jax.train.loop") == "train" and _component("pythia_jax") == "__init__"
    assert LAYER_OF["train"] > LAYER_OF["checkpoint"] > LAYER_OF["config"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None
