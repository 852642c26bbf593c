"""The converter packages' structure: old import paths still resolve, and importing the
converters pulls in neither the training package, JAX nor PyTorch (no ``convert`` -> ``train`` arrow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_the_converters_imports_no_training_code():
    code = ("import json, sys; import pythia_jax.convert.neox, pythia_jax.convert.hf; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pythia_jax', 'jax', 'torch'))))")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded = json.loads(out.stdout)
    assert "pythia_jax.convert.neox.zero" in loaded and "pythia_jax.host_memory" in loaded
    assert not [m for m in loaded if m.startswith(("pythia_jax.train", "jax", "torch"))], loaded


def test_old_import_paths_resolve_to_the_moved_objects():
    from pythia_jax import host_memory
    from pythia_jax.convert import hf, hf_keys, neox
    from pythia_jax.convert.neox import layout, read, write, yml, zero

    for name in ("aligned_empty", "copy_cast", "plain_pages", "to_numpy", "to_device_tree"):
        assert getattr(hf, name) is getattr(host_memory, name)
    for name in ("LAYER_TABLE", "GLOBAL_TABLE", "IGNORED_SUFFIXES", "KEY_ALIASES", "param_shapes",
                 "hf_shapes", "is_ignored_key"):
        assert getattr(hf, name) is getattr(hf_keys, name)
    assert neox.locate_neox_checkpoint is layout.locate_neox_checkpoint
    assert neox.read_neox_checkpoint is read.read_neox_checkpoint
    assert neox.read_neox_optimizer_state is zero.read_neox_optimizer_state
    assert neox.write_neox_checkpoint is write.write_neox_checkpoint
    assert neox.optimizer_settings is yml.optimizer_settings
    assert set(neox.__all__) <= set(dir(neox))
    # Optimizer continuation is training: only pythia_jax.train.continuation has it.
    assert not hasattr(neox, "fresh_opt_state") and not hasattr(neox, "neox_train_state")
