"""The built-in demo (``pythia-jax train --gin_file=configs/demo.gin``) end to end, shortened:
trains on the bundled Wikipedia data, checkpoints, exports an HF directory that transformers and
``pythia_jax.load`` both read, and prints how to load it."""

from __future__ import annotations

import contextlib
import io
import os

import jax
import numpy as np
import pytest

from pythia_jax import cli


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["train", "--gin_file=configs/demo.gin", "--gin.TrainConfig.num_steps=4",
            "--gin.TrainConfig.seq_length=32", "--gin.TrainConfig.global_batch=4",
            "--gin.TrainConfig.eval_every=2", "--gin.TrainConfig.eval_batches=1",
            "--gin.TrainConfig.checkpoint_every=2", "--gin.TrainConfig.progress_bar=False",
            f"--gin.TrainConfig.output_dir='{out}'"]  # the demo's export_hf "hf": <output_dir>/hf
    # The run happens here, not in the first test: under pytest-xdist the tests of this module
    # may land on different workers, and each must then see a finished run.
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(argv)
    return out, rc, stdout.getvalue()


def test_demo_trains_exports_and_prints_how_to_load(demo_run):
    out, rc, text = demo_run
    assert rc == 0
    hf_dir = str(out / "hf")
    assert f"GPTNeoXForCausalLM.from_pretrained({hf_dir!r})" in text
    assert f"pythia_jax.load({hf_dir!r})" in text
    assert "train loss: step 1" in text and "held-out loss at step 4" in text
    steps = sorted(int(p) for p in os.listdir(out / "checkpoints") if p.isdigit())
    assert steps == [0, 1, 2, 4]  # scaled-down Pythia schedule: 0, 1, 2, 4, then every 2
    assert os.path.isfile(os.path.join(hf_dir, "config.json"))
    assert not any(name.endswith(".npy") for name in os.listdir(os.path.dirname(
        __import__("pythia_jax.data", fromlist=["x"]).demo_data_prefix())))  # caches stay in the run dir


def test_demo_export_loads_in_transformers_and_pythia_jax(demo_run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import pythia_jax

    out, rc, _ = demo_run
    assert rc == 0
    hf_dir = out / "hf"
    tokens = np.array([[12092, 13, 309, 717, 0, 5, 7, 9]], np.int32)
    ours = pythia_jax.load(str(hf_dir))
    from_ckpt = pythia_jax.load(str(out / "checkpoints"))
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    with torch.no_grad():
        want = theirs(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(ours(tokens))
        got_ckpt = np.asarray(from_ckpt(tokens))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(got, got_ckpt)  # the export is the final checkpoint
