"""seqio vocabulary and Tasks for Pythia (optional extra: ``pip install .[seqio]``, needs TensorFlow).

Importing this module registers:

- ``pythia_<task>`` for every bundled zero-shot spec (``pythia_piqa``, ``pythia_arc_easy``, …):
  rank-classification examples, one per (document, choice), with ``inputs`` = context tokens and
  ``targets`` = continuation tokens exactly as lm-evaluation-harness splits them, plus ``idx``
  ``[doc, choice]``, ``is_correct`` and ``num_chars``. Score them with T5X's ``score`` mode (summed
  target log-likelihood); the score metric returns ``acc`` and ``acc_norm``. Files are read from
  the directory set with ``set_zero_shot_data_dir(path)`` (``<path>/<task>.jsonl``).
- ``pythia_demo_lm``: the bundled Wikipedia demo data as consecutive (seq_len + 1)-token rows;
  ``register_lm_task(name, prefix, order=...)`` registers Pile-style data (a pre-shuffled dataset
  in training order, or raw documents in GPT-NeoX order) the same way, ``targets`` only.

``PythiaVocabulary`` is the GPT-NeoX-20B BPE of the Pythia suite (EOD = 0 is seqio's EOS,
padding = 1).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from pythia_jax.config import EOD_TOKEN_ID, PAD_TOKEN_ID
from pythia_jax.errors import DataError

_ZERO_SHOT_DATA_DIR: str | None = None


class PythiaVocabulary(seqio.Vocabulary):
    """The Pythia tokenizer as a ``seqio.Vocabulary`` (no BOS, EOS = EOD 0, PAD = 1, no UNK)."""

    def __init__(self, extra_ids: int = 0):
        from pythia_jax.eval.tokens import get_tokenizer

        self._tokenizer = get_tokenizer()
        super().__init__(extra_ids=extra_ids)

    @property
    def eos_id(self) -> int:
        return EOD_TOKEN_ID

    @property
    def pad_id(self) -> int:
        return PAD_TOKEN_ID

    @property
    def unk_id(self) -> None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def _encode(self, s: str) -> Sequence[int]:
        from pythia_jax.eval.tokens import encode
        return encode(self._tokenizer, s)

    def _decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) != PAD_TOKEN_ID]
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def enc(x):
            return np.asarray(self._encode(x.numpy().decode("utf-8")), np.int32)
        out = tf.py_function(enc, [s], tf.int32)
        out.set_shape([None])
        return out

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def dec(x):
            arr = x.numpy()
            if arr.ndim == 1:
                return np.asarray(self._decode(arr.tolist()).encode("utf-8"), dtype=object)
            return np.asarray([self._decode(r.tolist()).encode("utf-8") for r in arr], dtype=object)
        out = tf.py_function(dec, [ids], tf.string)
        out.set_shape(ids.shape[:-1])
        return out

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, PythiaVocabulary) and other.extra_ids == self.extra_ids

    def __hash__(self) -> int:
        return hash(("PythiaVocabulary", self.extra_ids))


_VOCAB: PythiaVocabulary | None = None


def vocabulary() -> PythiaVocabulary:
    """The shared PythiaVocabulary instance."""
    global _VOCAB
    if _VOCAB is None:
        _VOCAB = PythiaVocabulary()
    return _VOCAB


def set_zero_shot_data_dir(path: str | os.PathLike) -> None:
    """Directory holding ``<task>.jsonl`` for the ``pythia_<task>`` zero-shot Tasks."""
    global _ZERO_SHOT_DATA_DIR
    _ZERO_SHOT_DATA_DIR = os.fspath(path)


# --------------------------------------------------------------------------- zero-shot tasks
def _zero_shot_examples(spec_name: str) -> list[dict[str, Any]]:
    from pythia_jax.eval import tasks as T
    from pythia_jax.eval.tokens import encode_pair

    if _ZERO_SHOT_DATA_DIR is None:
        raise DataError(f"pythia_{spec_name}: call pythia_jax.eval.seqio_tasks.set_zero_shot_data_dir() first")
    spec = T.load_spec(spec_name)
    tok = vocabulary()._tokenizer
    rows = []
    for ex in T.load_examples(spec, _ZERO_SHOT_DATA_DIR):
        for c, ((ctx, cont), choice) in enumerate(zip(ex.requests, ex.choice_texts)):
            ctx_ids, cont_ids = encode_pair(tok, ctx, cont)
            rows.append({"inputs": np.asarray(ctx_ids, np.int32), "targets": np.asarray(cont_ids, np.int32),
                         "inputs_pretokenized": ctx, "targets_pretokenized": cont,
                         "idx": np.asarray([ex.doc_id, c], np.int32), "is_correct": c == ex.gold,
                         "num_chars": len(choice)})
    return rows


def _zero_shot_dataset_fn(spec_name: str):
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        rows = _zero_shot_examples(spec_name)
        signature = {
            "inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32),
            "inputs_pretokenized": tf.TensorSpec([], tf.string),
            "targets_pretokenized": tf.TensorSpec([], tf.string),
            "idx": tf.TensorSpec([2], tf.int32), "is_correct": tf.TensorSpec([], tf.bool),
            "num_chars": tf.TensorSpec([], tf.int32)}
        return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=signature)
    return dataset_fn


def rank_classification_postprocess(output: Any, example: Mapping[str, Any] | None = None,
                                    is_target: bool = False) -> Any:
    """Targets become (doc, choice, is_correct, num_chars) so the score metric can group them."""
    if not is_target or example is None:
        return output
    idx = np.asarray(example["idx"]).tolist()
    return (int(idx[0]), int(idx[1]), bool(example["is_correct"]), int(example["num_chars"]))


def rank_classification_metric(targets: Sequence[tuple], scores: Sequence[float]) -> dict[str, float]:
    """``acc`` and ``acc_norm`` (as the harness) from per-choice log-likelihood scores."""
    docs: dict[int, list[tuple[int, bool, int, float]]] = {}
    for (doc, choice, correct, n_chars), score in zip(targets, scores):
        docs.setdefault(doc, []).append((choice, correct, n_chars, float(score)))
    from pythia_jax.eval.zero_shot import choice_hits

    hits = []
    for items in docs.values():
        items.sort()
        gold = [i[1] for i in items].index(True)
        hits.append(choice_hits([i[3] for i in items], [i[2] for i in items], gold))
    acc, acc_norm = zip(*hits)
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


def register_zero_shot_tasks() -> list[str]:
    """Register ``pythia_<name>`` for every bundled spec; returns the task names."""
    from pythia_jax.eval.tasks import available_tasks

    features = {"inputs": seqio.Feature(vocabulary(), add_eos=False, dtype=tf.int32),
                "targets": seqio.Feature(vocabulary(), add_eos=False, dtype=tf.int32)}
    names = []
    for spec_name in available_tasks():
        name = f"pythia_{spec_name}"
        if name in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name, source=seqio.FunctionDataSource(_zero_shot_dataset_fn(spec_name), splits=["validation"]),
            preprocessors=[], output_features=features, postprocess_fn=rank_classification_postprocess,
            metric_fns=[rank_classification_metric])
        names.append(name)
    return names


# --------------------------------------------------------------------------- LM data
def register_lm_task(name: str, data_prefix: str, *, order: str = "preshuffled", seq_len: int = 2048,
                     **order_kwargs: Any) -> str:
    """Register a seqio Task whose examples are training rows ``{"targets": int32 [seq_len + 1]}``
    of ``data_prefix`` in the given order (``preshuffled``, ``neox`` or ``sequential``), row 0
    first. The rows are already tokens, so no tokenization preprocessor runs."""
    from pythia_jax.data.orders import open_order

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        src = open_order(data_prefix, order, seq_len=seq_len, **order_kwargs)

        def rows():
            chunk = 256
            for start in range(0, len(src), chunk):
                block = src.read_rows(start, min(len(src), start + chunk))
                for r in block:
                    yield {"targets": r.astype(np.int32)}
        return tf.data.Dataset.from_generator(
            rows, output_signature={"targets": tf.TensorSpec([seq_len + 1], tf.int32)})

    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]), preprocessors=[],
        output_features={"targets": seqio.Feature(vocabulary(), add_eos=False, dtype=tf.int32)})
    return name


def _register_defaults() -> None:
    from pythia_jax.data import demo_data_prefix

    register_zero_shot_tasks()
    register_lm_task("pythia_demo_lm", demo_data_prefix(), order="sequential", seq_len=2048)


_register_defaults()
