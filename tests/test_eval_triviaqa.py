"""TriviaQA k-shot equals lm-evaluation-harness's ``triviaqa`` task (its own YAML, filters and
metric) run with its ``hf`` model, on local rows and a random tiny model; the adapter's batched
``generate_until`` equals one request at a time."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from pythia_jax.eval import triviaqa as T

DATA = Path(__file__).parent / "data" / "eval" / "triviaqa.jsonl"
MAX_NEW = 12


def test_normalisation_matches_harness_metric():
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    cases = [("Paris", ["paris"]), ("  The Beatles.", ["the beatles"]), ("U.S.A", ["USA"]),
             ("Sunset Blvd", ["Sunset Blvd.", "West Sunset Boulevard"]), ("new  york", ["New York"]),
             ("", ["x"]), ("Ça va!", ["ça va"]), (string.punctuation + "a", ["A"])]
    for out, aliases in cases:
        # the harness: remove_whitespace filter (strip), then exact_match against each alias
        pred = out.strip()
        ref = lm_metrics.exact_match_hf_evaluate([pred] * len(aliases), aliases, ignore_case=True,
                                                 ignore_punctuation=True)["exact_match"] > 0
        assert T.is_correct(out, aliases) == ref, (out, aliases)


def test_bad_rows(tmp_path):
    from pythia_jax.errors import DataError

    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": {"aliases": []}}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:1: expected a 'question' string"):
        T.load_rows(bad)
    with pytest.raises(DataError, match="no such file"):
        T.load_rows(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    pytest.importorskip("torch")
    from flax import nnx
    from lm_eval.models.huggingface import HFLM

    from pythia_jax.config import ModelConfig
    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.eval.lm_eval_adapter import PythiaJaxLM
    from pythia_jax.model import GPTNeoX, params_to_dict

    cfg = ModelConfig(name="tiny", vocab_size=50304, hidden_size=32, num_layers=2, num_heads=4,
                      max_position_embeddings=512)
    root = tmp_path_factory.mktemp("tqa")
    hf_dir = write_hf_dir(cfg, params_to_dict(GPTNeoX(cfg, rngs=nnx.Rngs(5))), root / "hf", dtype="float32")
    rows = T.load_rows(DATA)[:16]
    data = root / "triviaqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8, dtype="float32")
    ours = PythiaJaxLM(path=str(hf_dir), batch_size=8)
    return root, data, rows, theirs, ours


def _harness(lm, data, k, cache):
    import lm_eval
    from lm_eval import evaluator

    from pythia_jax.eval.lm_eval_adapter import harness_task_from_file

    task = harness_task_from_file(Path(lm_eval.__file__).parent / "tasks" / "triviaqa" / "default.yaml",
                                  data, cache_dir=cache)
    task.set_config("num_fewshot", k)
    task.set_fewshot_seed(1234)  # what simple_evaluate (the lm_eval CLI) does: fewshot_random_seed=1234
    task.config.generation_kwargs["max_gen_toks"] = MAX_NEW  # keeps the hf side fast
    out = evaluator.evaluate(lm=lm, task_dict={"triviaqa": task}, log_samples=True)
    samples = out["samples"]["triviaqa"]
    return out["results"]["triviaqa"]["exact_match,remove_whitespace"], samples


@pytest.mark.parametrize("k", [0, 2])
def test_triviaqa_equals_harness_hf(setup, k, tmp_path):
    from pythia_jax.eval.generate import Generator
    from pythia_jax.eval.tokens import get_tokenizer

    root, data, rows, theirs, ours = setup
    acc_hf, samples = _harness(theirs, data, k, tmp_path / "c")
    samples = sorted(samples, key=lambda s: s["doc_id"])
    # same prompts as the harness builds
    assert T.fewshot_prompts(rows, k) == [s["arguments"][0][0] for s in samples]
    gen = Generator(ours.generator.placed, batch_size=8)
    res = T.evaluate_triviaqa(gen, get_tokenizer(), T.TriviaQATask(str(data), k), max_gen_toks=MAX_NEW)
    assert [r["output"] for r in res.per_item] == [s["resps"][0][0] for s in samples]
    assert [float(r["correct"]) for r in res.per_item] == [s["exact_match"] for s in samples]
    assert res.accuracy == pytest.approx(acc_hf)


def test_triviaqa_scores_nontrivial_equal_harness(setup, tmp_path):
    """Rows whose aliases include variants (case, punctuation, spaces) of the model's own answers,
    so that some are right: per-row scores still equal the harness's."""
    from pythia_jax.eval.generate import Generator
    from pythia_jax.eval.tokens import get_tokenizer

    root, data, rows, theirs, ours = setup
    gen = Generator(ours.generator.placed, batch_size=8)
    first = T.evaluate_triviaqa(gen, get_tokenizer(), T.TriviaQATask(str(data), 0), max_gen_toks=MAX_NEW)
    rigged = []
    for i, (r, it) in enumerate(zip(rows, first.per_item)):
        r = json.loads(json.dumps(r))
        o = it["output"].strip()
        variant = [o.upper() + ".", " " + o, o.replace(" ", "  "), o][i % 4]
        r["answer"]["aliases"] = ["zzz", variant]
        rigged.append(r)
    data2 = root / "triviaqa_rigged.jsonl"
    data2.write_text("".join(json.dumps(r) + "\n" for r in rigged))
    acc_hf, samples = _harness(theirs, data2, 0, tmp_path / "c")
    samples = sorted(samples, key=lambda s: s["doc_id"])
    res = T.evaluate_triviaqa(gen, get_tokenizer(), T.TriviaQATask(str(data2), 0), max_gen_toks=MAX_NEW)
    assert [float(r["correct"]) for r in res.per_item] == [s["exact_match"] for s in samples]
    assert 0 < res.accuracy < 1 and res.accuracy == pytest.approx(acc_hf)


def test_adapter_generate_until_batched_equals_one_at_a_time(setup):
    """The adapter groups requests by gen_kwargs and batches them; results (in request order) equal
    one request per call, and lm_eval's hf model."""
    from lm_eval.api.instance import Instance

    root, data, rows, theirs, ours = setup
    kw_a = {"until": ["\n", ".", ","], "do_sample": False, "max_gen_toks": 24}
    kw_b = {"until": ["\n\n"], "max_gen_toks": 10}
    reqs = [Instance("generate_until", {}, (T.TEMPLATE.format(question=r["question"]), kw_a if i % 3 else kw_b), i)
            for i, r in enumerate(rows[:9])]
    batched = ours.generate_until(reqs, disable_tqdm=True)
    single = [ours.generate_until([r], disable_tqdm=True)[0] for r in reqs]
    assert batched == single
    assert batched == theirs.generate_until(reqs, disable_tqdm=True)
