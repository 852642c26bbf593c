"""K checkpoints stacked on a leading axis and scored in one compiled pass equal the checkpoints
scored one by one (<= 1e-5 in fp32): zero-shot requests, rolling documents and per-row losses."""

from __future__ import annotations

import numpy as np
import pytest

from pythia_jax.config import ModelConfig
from pythia_jax.errors import PythiaJaxError

CFG = ModelConfig(name="tiny", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                  max_position_embeddings=64)
K = 3


@pytest.fixture(scope="module")
def checkpoints():
    from flax import nnx

    from pythia_jax.model import GPTNeoX, params_to_dict

    return [params_to_dict(GPTNeoX(CFG, rngs=nnx.Rngs(seed))) for seed in range(K)]


def _requests(rng, n):
    reqs = [(rng.integers(0, CFG.vocab_size, int(rng.integers(1, 24))).tolist(),
             rng.integers(0, CFG.vocab_size, int(rng.integers(1, 8))).tolist()) for _ in range(n)]
    return reqs + [(rng.integers(0, CFG.vocab_size, 70).tolist(), [5, 6])]  # cut from the left


def test_stacked_loglikelihoods_equal_one_by_one(checkpoints):
    from pythia_jax.eval.runtime import place_model
    from pythia_jax.eval.scoring import Scorer
    from pythia_jax.eval.stacked import StackedScorer

    reqs = _requests(np.random.default_rng(0), 20)  # several length buckets, contexts cut at 64
    docs = [r[0] + r[1] for r in reqs[:9]]
    stacked = StackedScorer(checkpoints, CFG, batch_size=8)
    got = stacked.loglikelihood(reqs).loglik
    assert got.shape == (len(reqs), K) and got.dtype == np.float64
    single = Scorer(place_model(checkpoints[0], config=CFG), batch_size=8)
    for k, params in enumerate(checkpoints):
        single.placed.replace_params(params)  # one-by-one, compilations reused
        one = single.loglikelihood(reqs)
        np.testing.assert_allclose(got[:, k], one.loglik, rtol=1e-5, atol=1e-5)
        view = stacked.view(k).loglikelihood(reqs)
        np.testing.assert_allclose(view.loglik, one.loglik, rtol=1e-5, atol=1e-5)
        assert view.is_greedy.tolist() == one.is_greedy.tolist() and view.truncated == one.truncated > 0
        np.testing.assert_allclose(stacked.view(k).loglikelihood_rolling(docs).loglik,
                                   single.loglikelihood_rolling(docs).loglik, rtol=1e-5, atol=1e-5)
    # one compilation per batch shape serves all K checkpoints
    assert stacked._score._cache_size() == len(stacked.compiled_shapes)


def test_stacked_row_losses_equal_the_training_loss(checkpoints):
    import jax
    import optax

    from pythia_jax.eval.stacked import stacked_row_losses
    from pythia_jax.model import model_from_params

    rows = np.random.default_rng(1).integers(0, CFG.vocab_size, (10, 33))
    got = stacked_row_losses(checkpoints, CFG, rows, batch_size=4)
    assert got.shape == (10, K)
    for k, params in enumerate(checkpoints):
        logits = model_from_params(CFG, jax.tree.map(np.asarray, params))(rows[:, :-1])
        want = optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean(axis=1)
        np.testing.assert_allclose(got[:, k], np.asarray(want), rtol=1e-5, atol=1e-5)


def test_choose_stack_caps_to_the_budget(caplog):
    from pythia_jax.eval.stacked import choose_stack, stack_bytes

    one = stack_bytes(CFG, 1, 1024)
    assert choose_stack(CFG, 8, batch_tokens=1024, max_bytes=3 * one + 1) == 3
    assert choose_stack(CFG, 2, batch_tokens=1024, max_bytes=10 * one) == 2
    assert choose_stack(CFG, 8, batch_tokens=1024, max_bytes=1) == 1
    with pytest.raises(PythiaJaxError, match="--stack must be >= 1"):
        choose_stack(CFG, 0)
    with pytest.raises(PythiaJaxError, match="other parameter structure"):
        from pythia_jax.eval.stacked import stack_params
        stack_params([{"a": np.zeros(2)}, {"b": np.zeros(2)}])


def test_eval_stack_gives_the_per_step_table(checkpoints, tmp_path, capsys):
    """``pythia-jax eval --stack 3`` (perplexity over 3 checkpoints in one pass) writes the same
    table as the per-step evaluation; ``--stack 0`` is refused in one line."""
    import json

    from pythia_jax.checkpoint import save_params_checkpoint
    from pythia_jax.cli import main
    from pythia_jax.data.indexed import write_indexed_dataset

    ckpt = tmp_path / "ckpt"
    for step, params in zip((10, 20, 30), checkpoints):
        save_params_checkpoint(ckpt, step, CFG, params)
    rng = np.random.default_rng(2)
    data = write_indexed_dataset(str(tmp_path / "ppl"), [rng.integers(0, CFG.vocab_size, int(n)).astype(np.uint16)
                                                          for n in rng.integers(5, 150, 6)])
    tables = {}
    for stack in (1, 3):
        out = tmp_path / f"s{stack}.jsonl"
        assert main(["eval", "--checkpoints", str(ckpt), "--steps", "all", "--tasks", "perplexity",
                     "--ppl-data", data, "--out", str(out), "--stack", str(stack), "--no-progress",
                     "--batch-size", "4"]) == 0
        tables[stack] = {(r["step"], r["metric"]): r["value"] for r in map(json.loads, out.read_text().splitlines())}
    captured = capsys.readouterr()
    assert "stacking 3 checkpoint(s) per pass (asked 3" in captured.err
    assert "stacking" not in captured.out  # said once, with its estimate
    # the memory estimate's batch: the scorer's token cap, not batch_size x max_position_embeddings
    from pythia_jax.eval import stacked as S
    from pythia_jax.eval.scoring import MAX_BATCH_TOKENS

    seen = []
    real = S.choose_stack
    S.choose_stack = lambda *a, **k: seen.append(k["batch_tokens"]) or real(*a, **k)
    try:
        for batch, max_len in ((4, None), (10_000, None), (10_000, str(MAX_BATCH_TOKENS * 2))):
            main(["eval", "--checkpoints", str(ckpt), "--steps", "all", "--tasks", "perplexity", "--ppl-data", data,
                  "--out", str(tmp_path / f"cap{batch}{max_len}.jsonl"), "--stack", "3", "--no-progress",
                  "--batch-size", str(batch)] + (["--max-len", max_len] if max_len else []))
    finally:
        S.choose_stack = real
    longest = CFG.max_position_embeddings
    assert seen == [4 * longest, max(MAX_BATCH_TOKENS, longest), MAX_BATCH_TOKENS * 2]
    assert tables[1].keys() == tables[3].keys() and len(tables[1]) >= 6
    for key, value in tables[1].items():
        assert tables[3][key] == pytest.approx(value, rel=1e-5), key
    assert main(["eval", "--checkpoints", str(ckpt), "--steps", "all", "--tasks", "perplexity",
                 "--ppl-data", data, "--out", str(tmp_path / "x.jsonl"), "--stack", "0"]) == 2
    assert "--stack 0: expected K >= 1" in capsys.readouterr().err
