"""seqio vocabulary and Tasks (skipped when seqio / TensorFlow are not installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from pythia_jax.eval import seqio_tasks as S  # noqa: E402
from pythia_jax.eval import tasks as T  # noqa: E402
from pythia_jax.eval.tokens import get_tokenizer  # noqa: E402
from pythia_jax.eval.zero_shot import score_examples, tokenize_examples  # noqa: E402

DATA = Path(__file__).parent / "data" / "eval"


def test_vocabulary_round_trip():
    vocab = S.vocabulary()
    text = "Pythia: a suite for analyzing large language models across training."
    ids = vocab.encode(text)
    assert list(ids) == get_tokenizer().encode(text).ids
    assert vocab.decode(ids) == text
    assert vocab.decode(list(ids) + [0, 5, 6]) == text  # decoding stops at EOD (seqio's EOS)
    tf_ids = vocab.encode_tf(tf.constant(text))
    assert tf_ids.numpy().tolist() == list(ids)
    assert vocab.decode_tf(tf_ids).numpy().decode() == text
    assert vocab.eos_id == 0 and vocab.pad_id == 1 and vocab.vocab_size == 50277


@pytest.mark.parametrize("name", ["piqa", "winogrande", "arc_challenge"])
def test_zero_shot_task_matches_harness_tokens(name):
    S.set_zero_shot_data_dir(DATA)
    task = seqio.get_mixture_or_task(f"pythia_{name}")
    ds = list(task.get_dataset(split="validation", shuffle=False).as_numpy_iterator())
    spec = T.load_spec(name)
    examples = T.load_examples(spec, DATA)
    expected = tokenize_examples(get_tokenizer(), examples)
    assert [(r["inputs"].tolist(), r["targets"].tolist()) for r in ds] == expected
    # The score metric on some log-likelihoods equals the zero-shot scorer's metrics.
    scores = [-0.1 * len(r["targets"]) - (k % 3) for k, r in enumerate(ds)]
    targets = [S.rank_classification_postprocess(None, r, is_target=True) for r in ds]
    ours = score_examples(spec, examples, scores).metrics
    got = S.rank_classification_metric(targets, scores)
    for m in spec.metrics:
        assert got[m] == pytest.approx(ours[m][0])


def test_lm_task_rows(tmp_path):
    from pythia_jax.data.indexed import write_indexed_dataset
    from pythia_jax.data.orders import open_order

    rows = np.random.default_rng(0).integers(2, 50000, (5, 17))
    prefix = write_indexed_dataset(str(tmp_path / "pre"), list(rows))
    S.register_lm_task("pythia_test_lm", prefix, order="preshuffled", seq_len=16)
    ds = list(seqio.get_mixture_or_task("pythia_test_lm").get_dataset(split="train", shuffle=False)
              .as_numpy_iterator())
    assert np.array_equal(np.stack([r["targets"] for r in ds]), open_order(prefix, "preshuffled", seq_len=16)
                          .read_rows(0, 5))
    assert "pythia_demo_lm" in seqio.TaskRegistry.names()


def test_missing_data_dir(monkeypatch):
    from pythia_jax.errors import DataError

    monkeypatch.setattr(S, "_ZERO_SHOT_DATA_DIR", None)
    with pytest.raises(DataError, match="set_zero_shot_data_dir"):
        S._zero_shot_examples("piqa")
