"""lm-evaluation-harness tasks on local files (pythia_jax.eval.harness): LAMBADA, CrowS-Pairs and
LogiQA give, per document, what lm_eval's own ``hf`` model gives on the same weights and what a
direct PyTorch computation gives; the runner/CLI expand ``paper`` / ``bias``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
torch = pytest.importorskip("torch")

from pythia_jax.config import ModelConfig  # noqa: E402
from pythia_jax.errors import DataError, PythiaJaxError  # noqa: E402

DATA = Path(__file__).parent / "data" / "eval"
CFG = ModelConfig(name="tiny", vocab_size=50304, hidden_size=32, num_layers=2, num_heads=4,
                  max_position_embeddings=256)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from flax import nnx
    from lm_eval.models.huggingface import HFLM
    from transformers import GPTNeoXForCausalLM

    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.eval.lm_eval_adapter import PythiaJaxLM
    from pythia_jax.eval.tokens import get_tokenizer
    from pythia_jax.model import GPTNeoX, params_to_dict

    root = tmp_path_factory.mktemp("harness")
    hf_dir = write_hf_dir(CFG, params_to_dict(GPTNeoX(CFG, rngs=nnx.Rngs(3))), root / "hf" / "step0",
                          dtype="float32")
    ours = PythiaJaxLM(path=str(hf_dir), batch_size=8)
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8, dtype="float32")
    torch_model = GPTNeoXForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    return dict(root=root, hf_dir=hf_dir, ours=ours, theirs=theirs, torch=torch_model, tok=get_tokenizer())


def run_both(env, name, data_file):
    from pythia_jax.eval.harness import build_task, evaluate_task

    out = []
    for lm in (env["ours"], env["theirs"]):
        task = build_task(name, data_file, cache_dir=env["root"] / "ds")
        out.append(evaluate_task(lm, task, bootstrap_iters=0))
    return out


def torch_loglik(env, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Sum of log p(continuation | context) and whether every token is the argmax: plain PyTorch."""
    whole = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(env["torch"](whole[:, :-1]).logits[0].double(), -1)
    pos = range(len(context) - 1, len(context) + len(continuation) - 1)
    ll = sum(float(logp[p, t]) for p, t in zip(pos, continuation))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(pos, continuation))
    return ll, greedy


def test_lambada_openai_equals_harness_hf_and_torch(env):
    from pythia_jax.eval.tokens import encode

    ours, theirs = run_both(env, "lambada_openai", DATA / "lambada_openai.jsonl")
    assert ours.num_examples == theirs.num_examples == 30
    a = np.array([r["resps"][0] for r in ours.per_example], float)
    b = np.array([r["resps"][0] for r in theirs.per_example], float)
    np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-3, rtol=0)
    assert (a[:, 1] == b[:, 1]).all()
    assert ours.metrics["acc"][0] == theirs.metrics["acc"][0]
    np.testing.assert_allclose(ours.metrics["perplexity"][0], theirs.metrics["perplexity"][0], rtol=1e-4)
    # independent: the last word (after the last space) given the rest, whole-sequence tokenization
    texts = [json.loads(x)["text"] for x in (DATA / "lambada_openai.jsonl").read_text().splitlines()]
    for row, text in zip(ours.per_example, texts):
        ctx, word = text.rsplit(" ", 1)
        whole, n_ctx = encode(env["tok"], ctx + " " + word), len(encode(env["tok"], ctx))
        ll, greedy = torch_loglik(env, whole[:n_ctx], whole[n_ctx:])
        assert row["resps"][0][0] == pytest.approx(ll, abs=1e-3)
        assert row["acc"] == float(greedy) and row["target"] == " " + word
    lls = a[:, 0]
    assert ours.metrics["perplexity"][0] == pytest.approx(float(np.exp(-lls.mean())), rel=1e-9)


@pytest.mark.parametrize("name,bias", [("crows_pairs_gender", "gender"), ("crows_pairs", None)])
def test_crows_pairs_equals_harness_hf_and_torch(env, name, bias):
    from pythia_jax.config import EOD_TOKEN_ID
    from pythia_jax.eval.tokens import encode

    ours, theirs = run_both(env, name, DATA / "crows_pairs_anonymized.csv")
    with open(DATA / "crows_pairs_anonymized.csv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if bias is None or r["bias_type"].startswith(bias)]
    assert ours.num_examples == theirs.num_examples == len(rows) == (20 if bias else 44)
    for key in ("pct_stereotype", "likelihood_diff"):
        np.testing.assert_allclose([r[key] for r in ours.per_example], [r[key] for r in theirs.per_example],
                                   atol=1e-3, rtol=0)
        np.testing.assert_allclose(ours.metrics[key], theirs.metrics[key], atol=1e-3, rtol=1e-5)
    # independent: each sentence's total log-likelihood given EOD
    for row, doc in zip(ours.per_example, rows):
        more, _ = torch_loglik(env, [EOD_TOKEN_ID], encode(env["tok"], doc["sent_more"]))
        less, _ = torch_loglik(env, [EOD_TOKEN_ID], encode(env["tok"], doc["sent_less"]))
        assert row["pct_stereotype"] == float(more > less)
        assert row["likelihood_diff"] == pytest.approx(abs(more - less), abs=1e-3)
    assert ours.metrics["pct_stereotype"][0] == pytest.approx(np.mean([r["pct_stereotype"] for r in ours.per_example]))


def test_logiqa_local_query_field_and_equals_harness(env):
    from pythia_jax.eval.harness import build_task

    task = build_task("logiqa", DATA / "logiqa_synthetic.jsonl", cache_dir=env["root"] / "ds")
    doc = task.test_docs()[0]
    assert "Question: Which of the following must be true?\nChoices:\nA. " in task.doc_to_text(doc)
    assert task.doc_to_target(doc) == 1
    ours, theirs = run_both(env, "logiqa", DATA / "logiqa_synthetic.jsonl")
    a = [[x[0] for x in r["resps"]] for r in ours.per_example]
    b = [[x[0] for x in r["resps"]] for r in theirs.per_example]
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)
    assert {k: v[0] for k, v in ours.metrics.items()} == {k: v[0] for k, v in theirs.metrics.items()}


def test_bad_files_and_names(tmp_path, monkeypatch):
    from pythia_jax.eval import harness as H

    bad = tmp_path / "lambada_openai.jsonl"
    bad.write_text('{"passage": "no text field"}\n')
    with pytest.raises(DataError, match=r"lambada_openai.jsonl:1: .*needs fields \['text'\].*has \['passage'\]"):
        H.build_task("lambada_openai", bad)
    with pytest.raises(DataError, match="does not exist"):
        H.build_task("logiqa", tmp_path / "nope.jsonl")
    with pytest.raises(PythiaJaxError, match="unknown harness task"):
        H.build_task("hellaswagg", bad)
    assert H.canonical_name("crows_pairs_english_gender") == "crows_pairs_gender"
    monkeypatch.setattr(H, "lm_eval_available", lambda: False)
    with pytest.raises(PythiaJaxError, match=r"pip install 'pythia-jax\[lm_eval\]'"):
        H.build_task("lambada_openai", bad)


def test_groups_native_fallback_and_missing_harness(tmp_path, monkeypatch):
    from pythia_jax.eval import harness as H
    from pythia_jax.eval import runner as R

    assert R.expand_tasks(["paper"], str(DATA)) == list(R.PAPER_TASKS)
    (tmp_path / "wsc.jsonl").write_text("{}\n")
    assert R.expand_tasks(["paper", "bias", "crows_pairs_english"], str(tmp_path))[-4:] == [
        "wsc", "winobias", "crows_pairs_gender", "crows_pairs"]
    s = R.EvalSettings(tasks=["piqa"], data_dir=str(DATA), limit=2, task_system="native")
    resolved = R.check_tasks(s.tasks, s)
    assert isinstance(resolved["piqa"], tuple)  # the bundled spec
    with pytest.raises(PythiaJaxError, match="no native implementation"):
        R.check_tasks(["lambada_openai"], s)
    monkeypatch.setattr(H, "lm_eval_available", lambda: False)
    s.task_system = "auto"
    assert isinstance(R.check_tasks(["piqa"], s)["piqa"], tuple)
    with pytest.raises(PythiaJaxError, match="lm_eval is not installed"):
        R.check_tasks(["crows_pairs_gender"], s)


def test_cli_bias_and_lambada_table(env, tmp_path, monkeypatch, capsys):
    """``pythia-jax eval --tasks bias,lambada_openai`` on HF revision folders: one table with net
    bias, pct_stereotype and LAMBADA accuracy whose values equal the harness run above."""
    from pythia_jax.cli import main
    from pythia_jax.eval.runner import read_table

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    out = tmp_path / "res.jsonl"
    assert main(["eval", "--checkpoints", str(Path(env["hf_dir"]).parent), "--steps", "0", "--tasks",
                 "bias,lambada_openai", "--data-dir", str(DATA), "--limit", "3", "--out", str(out),
                 "--batch-size", "8", "--bootstrap-iters", "0", "--no-progress"]) == 0
    rows = {(r["task"], r["metric"]): r for r in read_table(out)}
    assert rows[("winobias", "net_bias")]["num_examples"] == 12
    assert rows[("winobias", "net_bias")]["value"] == pytest.approx(
        rows[("winobias", "pro")]["value"] - rows[("winobias", "anti")]["value"])
    assert rows[("crows_pairs_gender", "pct_stereotype")]["num_examples"] == 3
    assert rows[("lambada_openai", "acc")]["num_examples"] == 3
    assert ("lambada_openai", "perplexity") in rows
    details = [json.loads(x) for x in (tmp_path / "res_details" / "step0_crows_pairs_gender.jsonl")
               .read_text().splitlines()]
    assert [d["doc_id"] for d in details] == [0, 1, 2]
    assert "net_bias" in capsys.readouterr().out


def test_check_tasks_resolves_every_family_in_one_run():
    """One --tasks list with a harness task, a native spec, WinoBias, arithmetic and TriviaQA
    (few-shot, one task per k) and perplexity: each resolves to its own kind (what the runner
    dispatches on), before any model is loaded."""
    from lm_eval.api.task import ConfigurableTask

    from pythia_jax.eval import arithmetic, triviaqa
    from pythia_jax.eval import runner as R
    from pythia_jax.eval.winobias import WinoBiasExample

    s = R.EvalSettings(tasks=[], data_dir=str(DATA), limit=2, shots=[0, 2], ppl_data="x.jsonl")
    got = R.check_tasks(["lambada_openai", "crows_pairs_english_gender", "winobias", "arithmetic_plus",
                         "triviaqa", "perplexity", str(Path(R.__file__).parent / "task_specs" / "piqa.yaml")], s)
    assert list(got) == ["lambada_openai", "crows_pairs_gender", "winobias", "arithmetic_plus_k0",
                         "arithmetic_plus_k2", "triviaqa_k0", "triviaqa_k2", "perplexity", "piqa"]
    assert isinstance(got["lambada_openai"], ConfigurableTask)
    assert isinstance(got["crows_pairs_gender"], ConfigurableTask)
    assert all(isinstance(x, WinoBiasExample) for v in got["winobias"].values() for x in v)
    assert isinstance(got["arithmetic_plus_k2"], arithmetic.ArithmeticTask) and got["arithmetic_plus_k2"].k == 2
    assert isinstance(got["triviaqa_k2"], triviaqa.TriviaQATask) and got["triviaqa_k2"].k == 2
    assert got["perplexity"] is None and isinstance(got["piqa"], tuple)
