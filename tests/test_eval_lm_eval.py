"""The lm-eval adapter gives the same per-request results as lm_eval's own ``hf`` model on the
exported HF directory, for a multiple-choice task defined here from a local file (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm_eval's hf model needs it
torch = pytest.importorskip("torch")

from pythia_jax.config import ModelConfig  # noqa: E402

DATA = Path(__file__).parent / "data" / "eval"
CFG = ModelConfig(name="tiny", vocab_size=50304, hidden_size=32, num_layers=2, num_heads=4,
                  max_position_embeddings=64)

TASK_YAML = """\
task: local_piqa
dataset_path: json
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{goal}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(our adapter, lm_eval's HFLM) on the same exported weights, and the task."""
    from flax import nnx
    from lm_eval.models.huggingface import HFLM

    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.eval.lm_eval_adapter import PythiaJaxLM, harness_task_from_file
    from pythia_jax.model import GPTNeoX, params_to_dict

    root = tmp_path_factory.mktemp("lmeval")
    hf_dir = write_hf_dir(CFG, params_to_dict(GPTNeoX(CFG, rngs=nnx.Rngs(1))), root / "hf", dtype="float32")
    ours = PythiaJaxLM(path=str(hf_dir), batch_size=8)
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8, dtype="float32")
    (root / "local_piqa.yaml").write_text(TASK_YAML)
    # A long first goal overflows the 64-token window: the truncation path is compared too.
    rows = [json.loads(x) for x in (DATA / "piqa.jsonl").read_text().splitlines()[:10]]
    rows[0]["goal"] = " ".join([rows[0]["goal"]] * 6)
    data = root / "local_piqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = harness_task_from_file(root / "local_piqa.yaml", data, cache_dir=root / "hf_datasets")
    return ours, theirs, task, root


def test_loglikelihood_requests_match_hf(models):
    ours, theirs, task, _ = models
    task.build_all_requests(limit=None, rank=0, world_size=1)
    reqs = task.instances
    assert len(reqs) == 20
    a = ours.loglikelihood(reqs, disable_tqdm=True)
    b = theirs.loglikelihood(reqs, disable_tqdm=True)
    np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=1e-4, rtol=0)
    assert [x[1] for x in a] == [x[1] for x in b]


def test_rolling_and_generation_match_hf(models):
    from lm_eval.api.instance import Instance

    ours, theirs, _, _ = models
    texts = ["The quick brown fox jumps over the lazy dog.", "Pythia suite " * 40]
    roll = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    np.testing.assert_allclose(ours.loglikelihood_rolling(roll, disable_tqdm=True),
                               theirs.loglikelihood_rolling(roll, disable_tqdm=True), atol=1e-3, rtol=0)
    gen = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), i)
           for i, p in enumerate(["Question: What is a fox?\nAnswer:", "Once upon a time"])]
    assert ours.generate_until(gen, disable_tqdm=True) == theirs.generate_until(gen, disable_tqdm=True)


def test_registered_and_simple_evaluate(models, tmp_path):
    """``--model pythia_jax`` resolves to the adapter; a whole evaluation gives the hf model's metrics."""
    from lm_eval import evaluator
    from lm_eval.api.registry import get_model

    from pythia_jax.eval.lm_eval_adapter import PythiaJaxLM, harness_task_from_file

    assert get_model("pythia_jax") is PythiaJaxLM
    ours, theirs, _, root = models
    results = []
    for lm in (ours, theirs):
        task = harness_task_from_file(root / "local_piqa.yaml", root / "local_piqa.jsonl",
                                      cache_dir=tmp_path)
        out = evaluator.evaluate(lm=lm, task_dict={"local_piqa": task})
        results.append(out["results"]["local_piqa"])
    for key in ("acc,none", "acc_norm,none"):
        assert results[0][key] == results[1][key]


def test_pythia_jax_lm_eval_command_runs_the_harness_cli(models, tmp_path, monkeypatch):
    """``pythia-jax lm-eval --model pythia_jax ...`` is lm_eval's own CLI with our model: it runs a
    local task end to end and reports the same accuracy as lm_eval's evaluator with our adapter."""
    from lm_eval import evaluator

    from pythia_jax.cli import main
    from pythia_jax.eval.lm_eval_adapter import harness_task_from_file

    ours, _, _, root = models
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    yaml_text = TASK_YAML.replace("task: local_piqa", "task: local_piqa_cli") + (
        f"dataset_kwargs:\n  data_files:\n    validation: {root / 'local_piqa.jsonl'}\n")
    (task_dir / "local_piqa_cli.yaml").write_text(yaml_text)
    out_dir = tmp_path / "out"
    rc = main(["lm-eval", "--model", "pythia_jax", "--model_args", f"path={root / 'hf'}",
               "--include_path", str(task_dir), "--tasks", "local_piqa_cli", "--batch_size", "8",
               "--output_path", str(out_dir)])
    assert rc == 0
    result_files = sorted(out_dir.rglob("results*.json"))
    assert result_files, list(out_dir.rglob("*"))
    cli_results = json.loads(result_files[-1].read_text())["results"]["local_piqa_cli"]
    task = harness_task_from_file(root / "local_piqa.yaml", root / "local_piqa.jsonl", cache_dir=tmp_path / "c")
    expected = evaluator.evaluate(lm=ours, task_dict={"local_piqa": task})["results"]["local_piqa"]
    for key in ("acc,none", "acc_norm,none"):
        assert cli_results[key] == expected[key]


def test_harness_models_still_resolve_after_registering_pythia_jax():
    """lm-eval imports its own model list only while the registry is empty; registering
    ``pythia_jax`` first hid ``hf`` & co ("no model for this name found! Supported model names:
    pythia_jax"). A fresh interpreter, as ``pythia-jax lm-eval`` starts, resolves both."""
    import subprocess
    import sys

    code = ("import pythia_jax.eval.lm_eval_adapter as a\n"
            "from lm_eval.api.registry import get_model\n"
            "assert get_model('pythia_jax') is a.PythiaJaxLM\n"
            "print(get_model('hf').__name__, get_model('hf-auto').__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["HFLM", "HFLM"]
