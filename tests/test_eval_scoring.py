"""Scoring equals HF PyTorch on the exported model for every zero-shot task (fp32, ≤ 1e-4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pythia_jax.config import ModelConfig  # noqa: E402
from pythia_jax.eval import tasks as T  # noqa: E402
from pythia_jax.eval.scoring import Scorer  # noqa: E402
from pythia_jax.eval.tokens import get_tokenizer, rolling_windows  # noqa: E402
from pythia_jax.eval.zero_shot import evaluate_task, score_examples, tokenize_examples  # noqa: E402

DATA = Path(__file__).parent / "data" / "eval"
TASKS = ["piqa", "arc_easy", "arc_challenge", "sciq", "winogrande"]
WINDOW = 64  # small, so that SciQ's support paragraphs overflow and get truncated


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random GPT-NeoX (full Pythia vocabulary), its HF export and the HF PyTorch model."""
    from flax import nnx

    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.model import GPTNeoX, params_to_dict

    cfg = ModelConfig(name="tiny", vocab_size=50304, hidden_size=32, num_layers=2, num_heads=4,
                      max_position_embeddings=WINDOW)
    model = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    params = params_to_dict(model)
    out = write_hf_dir(cfg, params, tmp_path_factory.mktemp("hf") / "tiny", dtype="float32")
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    return model, hf, out


@pytest.fixture(scope="module")
def scorer(exported):
    return Scorer(exported[0], batch_size=8)


def hf_loglik(hf, requests, window: int) -> np.ndarray:
    """The HF model's summed continuation log-probabilities, fed like the harness's HF model."""
    out = []
    for ctx, cont in requests:
        whole = (list(ctx) + list(cont))[-(window + 1):]
        with torch.no_grad():
            logits = hf(torch.tensor([whole[:-1]])).logits[0].float()
        lp = torch.log_softmax(logits, -1)[-len(cont):]
        out.append(lp.gather(-1, torch.tensor(whole[-len(cont):])[:, None]).sum().item())
    return np.asarray(out)


@pytest.mark.parametrize("name", TASKS)
def test_task_logliks_equal_hf(exported, scorer, name):
    hf = exported[1]
    tok = get_tokenizer()
    spec = T.load_spec(name)
    examples = T.load_examples(spec, DATA, limit=8)
    requests = tokenize_examples(tok, examples)
    shapes_before = set(scorer.compiled_shapes)
    ours = scorer.loglikelihood(requests)
    # bucketed: a handful of shapes per task, not one per example
    assert len(scorer.compiled_shapes - shapes_before) <= 4
    ref = hf_loglik(hf, requests, WINDOW)
    np.testing.assert_allclose(ours.loglik, ref, atol=1e-4, rtol=0)
    expected_trunc = sum(len(c) + len(x) > WINDOW + 1 for c, x in requests)
    assert ours.truncated == expected_trunc
    if name == "sciq":
        assert expected_trunc > 0  # the window cut some contexts from the left
    res = evaluate_task(scorer, tok, spec, examples)
    theirs = score_examples(spec, examples, ref)
    assert res.metrics == theirs.metrics
    assert [r["acc"] for r in res.per_example] == [r["acc"] for r in theirs.per_example]


def test_rolling_equals_hf(exported, scorer):
    hf = exported[1]
    rng = np.random.default_rng(1)
    docs = [rng.integers(2, 50000, n).tolist() for n in (5, 64, 65, 150)]
    res = scorer.loglikelihood_rolling(docs)
    for d, doc in enumerate(docs):
        ref = hf_loglik(hf, list(rolling_windows(doc, WINDOW)), WINDOW).sum()
        assert abs(res.loglik[d] - ref) < 1e-3
        # every token scored once: the full-context sum over a short doc equals one window
        if len(doc) <= WINDOW:
            assert abs(res.loglik[d] - hf_loglik(hf, [([0], doc)], WINDOW)[0]) < 1e-4
    assert res.num_tokens.tolist() == [5, 64, 65, 150]
    # A token budget shrinks the batch of long buckets; results do not change.
    small = Scorer(exported[0], batch_size=8, max_batch_tokens=128)
    np.testing.assert_allclose(small.loglikelihood_rolling(docs).loglik, res.loglik, atol=1e-4)
    assert {b for b, L, _ in small.compiled_shapes if L == 64} == {2}


def test_bad_requests(scorer):
    from pythia_jax.errors import PythiaJaxError

    with pytest.raises(PythiaJaxError, match="empty continuation"):
        scorer.loglikelihood([([1, 2], [])])
    with pytest.raises(PythiaJaxError, match="longer than the window"):
        scorer.loglikelihood([([1], list(range(2, 2 + WINDOW + 1)))])


def test_token_ids_outside_vocab_refused(scorer):
    """Ids past the vocabulary read NaN embeddings inside jit (every loglik NaN, no error), negative
    ids wrap around: both are refused on the host before any batch runs, for plain and rolling."""
    from pythia_jax.errors import TokenIdError

    with pytest.raises(TokenIdError, match=r"token ids of the 2 scoring requests lie outside the model's "
                                           r"vocabulary: ids from 1 to 50304, but vocab_size is 50304"):
        scorer.loglikelihood([([1, 2], [3]), ([4], [50304])])
    with pytest.raises(TokenIdError, match="ids from -1 to"):
        scorer.loglikelihood([([-1], [3])])
    with pytest.raises(TokenIdError, match="ids from 0 to 60000"):
        scorer.loglikelihood_rolling([[5, 60000, 7]])
