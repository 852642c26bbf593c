"""The arithmetic task family: prompts, answers and few-shot choices in the stated format; scoring;
the runner's ``arithmetic*`` tasks and their rows/details."""

from __future__ import annotations

import json
import re

import pytest

from pythia_jax.errors import PythiaJaxError
from pythia_jax.eval import arithmetic as A


def test_prompt_format_zero_and_few_shot():
    assert A.prompt("plus", 7, 3, 0) == "Q:What is 7 plus 3? A:"
    assert A.prompt("times", 0, 50, 0) == "Q:What is 0 times 50? A:"
    p = A.prompt("times", 12, 9, 4)
    lines = p.split("\n")
    assert len(lines) == 5 and lines[-1] == "Q:What is 12 times 9? A:"
    line_re = re.compile(r"^Q:What is (\d+) times (\d+)\? A: (\d+)$")
    ex = A.fewshot_examples("times", 12, 9, 4)
    for line, (a, b) in zip(lines[:-1], ex):
        m = line_re.match(line)
        assert m and (int(m.group(1)), int(m.group(2)), int(m.group(3))) == (a, b, a * b)


def test_fewshot_examples_are_other_operands_deterministic_and_nested():
    for op in A.OPERATIONS:
        for x1 in (0, 1, 37, 50, 99):
            for x2 in (1, 25, 50):
                ex16 = A.fewshot_examples(op, x1, x2, 16)
                assert len(ex16) == 16
                firsts = [a for a, _ in ex16]
                assert len(set(firsts)) == 16 and all(0 <= a <= 99 and a != x1 for a in firsts)
                assert all(1 <= b <= 50 and b != x1 for _, b in ex16)
                for k in A.DEFAULT_SHOTS:
                    assert A.fewshot_examples(op, x1, x2, k) == ex16[:k]
    assert A.fewshot_examples("plus", 5, 5, 8) == A.fewshot_examples("plus", 5, 5, 8)
    assert A.fewshot_examples("plus", 5, 5, 8) != A.fewshot_examples("plus", 5, 6, 8)
    with pytest.raises(PythiaJaxError, match="shots"):
        A.fewshot_examples("plus", 5, 5, 17)


def test_answers_and_first_integer():
    assert A.answer("plus", 99, 50) == 149 and A.answer("times", 99, 50) == 4950
    assert A.first_integer(" 42") == 42
    assert A.first_integer(" the answer is 42, not 7") == 42
    assert A.first_integer(" 4,950 apples") == 4950
    assert A.first_integer(" none") is None
    assert A.first_integer("-3") == -3


def test_task_expansion():
    names = lambda ts: [t.name for t in ts]  # noqa: E731
    assert names(A.expand_task_name("arithmetic", None)) == [
        f"arithmetic_{op}_k{k}" for op in ("plus", "times") for k in (0, 2, 4, 8, 16)]
    assert names(A.expand_task_name("arithmetic_times", [0, 4])) == ["arithmetic_times_k0", "arithmetic_times_k4"]
    (t,) = A.expand_task_name("arithmetic_plus_k8", [0, 4], limit=3)
    assert (t.op, t.k, t.second) == ("plus", 8, (1, 2, 3))
    assert len(A.ArithmeticTask("plus", 0).items()) == 100 * 50
    assert A.expand_task_name("piqa", None) is None
    with pytest.raises(PythiaJaxError, match="0…16"):
        A.expand_task_name("arithmetic", [32])


def test_scoring_uses_first_integer(monkeypatch):
    """Correct iff the first integer of the (stop-cut) output equals the answer; per-operand rows."""
    from pythia_jax.eval import generate

    def fake(generator, tokenizer, prompts, until, max_new, **kw):
        assert until == ["\n"] and max_new == 16
        out = []
        for p in prompts:
            a, op, b = re.findall(r"What is (\d+) (plus|times) (\d+)\? A:$", tokenizer.decode(p))[0]
            ans = A.answer(op, int(a), int(b))
            out.append(f" {ans} apples" if int(a) % 2 == 0 else f" {ans + 1}")
        return out

    monkeypatch.setattr(generate, "generate_until", fake)
    from pythia_jax.eval.tokens import get_tokenizer
    task = A.ArithmeticTask("times", 2, operands=(2, 3), second=(1, 2, 3))
    res = A.evaluate_arithmetic(None, get_tokenizer(), task)
    assert res.accuracy == pytest.approx(0.5)
    assert res.per_operand == [
        {"op": "times", "x1": 2, "k": 2, "correct": 3, "total": 3, "acc": 1.0},
        {"op": "times", "x1": 3, "k": 2, "correct": 0, "total": 3, "acc": 0.0}]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Two 'steps' of a tiny random model as HF revision folders."""
    from flax import nnx

    from pythia_jax.config import ModelConfig
    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.model import GPTNeoX, params_to_dict

    cfg = ModelConfig(name="tiny", vocab_size=50304, hidden_size=32, num_layers=1, num_heads=4,
                      max_position_embeddings=512)
    root = tmp_path_factory.mktemp("arith_ckpts")
    for step, seed in ((0, 0), (10, 1)):
        write_hf_dir(cfg, params_to_dict(GPTNeoX(cfg, rngs=nnx.Rngs(seed))), root / f"step{step}",
                     dtype="float32")
    return root


def test_runner_rows_and_details(tiny_checkpoints, tmp_path):
    """``pythia-jax eval --tasks arithmetic_plus --shots 0,2 --limit 2``: one acc row per (step, task),
    per-item details whose outputs equal one-at-a-time generation of the same prompts."""
    from pythia_jax.cli import main
    from pythia_jax.eval.generate import Generator, generate_until
    from pythia_jax.eval.loading import load_model_params
    from pythia_jax.eval.runtime import place_model
    from pythia_jax.eval.tokens import encode, get_tokenizer

    out = tmp_path / "res.jsonl"
    rc = main(["eval", "--checkpoints", str(tiny_checkpoints), "--steps", "0,10", "--tasks",
               "arithmetic_plus", "--shots", "0,2", "--limit", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["step"], r["task"]) for r in rows) == [
        (s, f"arithmetic_plus_k{k}") for s in (0, 10) for k in (0, 2)]
    assert all(r["metric"] == "acc" and r["num_examples"] == 200 for r in rows)
    details = tmp_path / "res_details" / "step10_arithmetic_plus_k2.jsonl"
    det = [json.loads(x) for x in details.read_text().splitlines()]
    assert len(det) == 200 and {d["x2"] for d in det} == {1, 2}
    by_task = {r["task"]: r for r in rows if r["step"] == 10}
    assert by_task["arithmetic_plus_k2"]["value"] == pytest.approx(sum(d["correct"] for d in det) / 200)
    # the batched outputs equal generating a few items one at a time
    tok = get_tokenizer()
    cfg, params = load_model_params(tiny_checkpoints, 10)
    gen = Generator(place_model(params, config=cfg), batch_size=1)
    for d in det[::67]:
        p = encode(tok, A.prompt("plus", d["x1"], d["x2"], 2))
        assert generate_until(gen, tok, [p], ["\n"], 16) == [d["output"]]
    # rerun: nothing left to do
    assert main(["eval", "--checkpoints", str(tiny_checkpoints), "--steps", "0,10", "--tasks",
                 "arithmetic_plus", "--shots", "0,2", "--limit", "2", "--out", str(out), "--no-progress"]) == 0
    assert len(out.read_text().splitlines()) == 4


def test_bad_shots_is_one_clear_error(tiny_checkpoints, tmp_path):
    from pythia_jax.cli import main

    rc = main(["eval", "--checkpoints", str(tiny_checkpoints), "--steps", "0", "--tasks", "arithmetic",
               "--shots", "0,x", "--out", str(tmp_path / "r.jsonl")])
    assert rc == 2
    rc = main(["eval", "--checkpoints", str(tiny_checkpoints), "--steps", "0", "--tasks", "arithmetic",
               "--shots", "40", "--out", str(tmp_path / "r.jsonl")])
    assert rc == 2
    assert not (tmp_path / "r.jsonl").exists()
