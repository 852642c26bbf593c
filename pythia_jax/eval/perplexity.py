"""Loss / perplexity of whole documents, per token and per document.

Documents come from an indexed dataset (``doc_idx`` boundaries; tokens as stored, the trailing EOD
included) or a JSONL file of texts (tokenized with the Pythia tokenizer). Each document is scored
with the rolling-window log-likelihood of lm-evaluation-harness (first token conditioned on EOD,
disjoint windows of the model's context length).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import numpy as np

from pythia_jax.errors import DataError
from pythia_jax.eval.zero_shot import mean_stderr
from pythia_jax.io_utils import iter_jsonl_objects


def documents_from_indexed(prefix: str, limit: int | None = None) -> list[np.ndarray]:
    """Token arrays int [n_tokens] of the first ``limit`` documents of an indexed dataset."""
    from pythia_jax.data.indexed import IndexedDataset

    try:
        ds = IndexedDataset(prefix)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot open indexed dataset {prefix}: {e}") from None
    doc_idx = np.asarray(ds.index.doc_idx, np.int64)
    if doc_idx.size < 2:
        bounds = [(0, len(ds))]
    else:
        bounds = list(zip(doc_idx[:-1], doc_idx[1:]))
    docs = []
    for start, stop in bounds[:limit]:
        parts = [np.asarray(ds[int(i)], np.int64) for i in range(int(start), int(stop))]
        doc = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if doc.size:
            docs.append(doc)
    if not docs:
        raise DataError(f"{prefix}: no documents")
    return docs


def texts_from_jsonl(path: str | os.PathLike, text_key: str = "text", limit: int | None = None) -> list[str]:
    """The ``text_key`` strings of a JSONL file; a bad line raises DataError naming it."""
    texts = []
    for lineno, row in iter_jsonl_objects(path):
        if limit is not None and len(texts) >= limit:
            break
        if not isinstance(row.get(text_key), str):
            raise DataError(f"{path}:{lineno}: needs a string field {text_key!r}")
        if row[text_key]:
            texts.append(row[text_key])
    if not texts:
        raise DataError(f"{path}: no documents")
    return texts


def perplexity_metrics(loglik: np.ndarray, num_tokens: np.ndarray,
                       texts: Sequence[str] | None = None) -> dict[str, tuple[float, float]]:
    """name -> (value, stderr): token-level ``loss`` (nats/token) and ``perplexity``, per-document
    ``doc_loss`` (mean over documents of their per-token loss, with stderr); with texts also the
    harness's ``word_perplexity`` and ``bits_per_byte``."""
    nan = float("nan")
    total_tokens = float(np.sum(num_tokens))
    loss = -float(np.sum(loglik)) / total_tokens
    per_doc = (-np.asarray(loglik) / np.asarray(num_tokens)).tolist()
    out = {"loss": (loss, nan), "perplexity": (math.exp(loss), nan),
           "doc_loss": (float(np.mean(per_doc)), mean_stderr(per_doc))}
    if texts is not None:
        words = sum(len(re.split(r"\s+", t)) for t in texts)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        out["word_perplexity"] = (math.exp(-float(np.sum(loglik)) / words), nan)
        out["bits_per_byte"] = (-float(np.sum(loglik)) / nbytes / math.log(2), nan)
    return out


def evaluate_perplexity(scorer: Any, documents: Sequence[Sequence[int]], texts: Sequence[str] | None = None,
                        progress: bool = False) -> tuple[dict[str, tuple[float, float]], list[dict]]:
    """(metrics, per-document rows {doc_id, loglik, num_tokens}) for token ``documents``."""
    res = scorer.loglikelihood_rolling(documents, progress=progress)
    rows = [{"doc_id": i, "loglik": float(ll), "num_tokens": int(n)}
            for i, (ll, n) in enumerate(zip(res.loglik, res.num_tokens))]
    return perplexity_metrics(res.loglik, res.num_tokens, texts), rows
