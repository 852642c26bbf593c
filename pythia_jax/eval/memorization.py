"""Memorization (the Pythia paper's case study): a training row counts as memorized by a checkpoint
when, prompted with its first 32 tokens, greedy decoding reproduces the next 32 tokens exactly.

The rows a checkpoint ``step<N>`` has seen are training rows [0, 1024·N) of the exact data order
(``pythia_jax.data.orders``); all of them or a random sample are tested. Results per row
(row index, exact match, number of matching tokens) are saved as ``.npy``; the summary per
checkpoint is the memorized fraction with its standard error.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from pythia_jax.errors import DataError
from pythia_jax.eval.zero_shot import mean_stderr

ROW_DTYPE = np.dtype([("row", np.int64), ("memorized", np.bool_), ("matched", np.int16)])


@dataclasses.dataclass
class MemorizationResult:
    """``per_row``: structured array of ROW_DTYPE (row, memorized, matched tokens)."""

    per_row: np.ndarray
    prompt_len: int
    gen_len: int

    def summary(self) -> dict[str, tuple[float, float]]:
        nan = float("nan")
        if len(self.per_row) == 0:
            return {"memorized": (nan, nan), "token_accuracy": (nan, nan), "num_memorized": (0.0, nan)}
        m = self.per_row["memorized"].astype(np.float64)
        acc = self.per_row["matched"].astype(np.float64) / self.gen_len
        return {"memorized": (float(m.mean()), mean_stderr(m.tolist())),
                "token_accuracy": (float(acc.mean()), mean_stderr(acc.tolist())),
                "num_memorized": (float(m.sum()), float("nan"))}

    def save(self, path: str | os.PathLike) -> str:
        """Write ``per_row`` as ``.npy`` atomically; returns the path."""
        from pythia_jax.io_utils import atomic_files

        path = os.fspath(path)
        with atomic_files(path) as (tmp,), open(tmp, "wb") as f:
            np.save(f, self.per_row)
        return path


def seen_rows(step: int, batch_size: int = 1024) -> range:
    """Training rows a checkpoint saved after ``step`` updates has seen: [0, batch_size·step)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return range(0, batch_size * step)


def select_rows(step: int, *, batch_size: int = 1024, sample: int | None = None, seed: int = 0,
                num_rows: int | None = None) -> np.ndarray:
    """Rows to test for ``step``: all seen rows, or ``sample`` of them drawn without replacement
    (sorted; the same seed gives the same draw). ``num_rows`` caps at the data's length."""
    n = batch_size * step
    if num_rows is not None and n > num_rows:
        raise DataError(f"step {step} has seen {n} rows but the data order has only {num_rows}")
    if sample is None or sample >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=sample, replace=False)).astype(np.int64)


def memorization_scores(generator: Any, sequences: np.ndarray, rows: Sequence[int] | None = None, *,
                        prompt_len: int = 32, gen_len: int = 32) -> MemorizationResult:
    """Greedy-decode ``gen_len`` tokens after the first ``prompt_len`` tokens of each sequence
    (int [n, >= prompt_len + gen_len]) and compare with the true next tokens.

    ``generator``: a ``pythia_jax.eval.generate.Generator``; decoding does not stop at EOD (the
    true continuation may contain EOD).
    """
    sequences = np.asarray(sequences)
    if sequences.ndim != 2 or sequences.shape[1] < prompt_len + gen_len:
        raise DataError(f"memorization needs rows of at least {prompt_len + gen_len} tokens, "
                        f"got shape {sequences.shape}")
    prompts = sequences[:, :prompt_len].astype(np.int64)
    truth = sequences[:, prompt_len:prompt_len + gen_len].astype(np.int64)
    out = generator.generate([p.tolist() for p in prompts], gen_len, stop_token=None)
    pred = np.asarray(out, np.int64)
    equal = pred == truth
    per_row = np.zeros(len(sequences), ROW_DTYPE)
    per_row["row"] = np.arange(len(sequences)) if rows is None else np.asarray(rows, np.int64)
    per_row["memorized"] = equal.all(axis=1)
    per_row["matched"] = equal.sum(axis=1)
    return MemorizationResult(per_row=per_row, prompt_len=prompt_len, gen_len=gen_len)


def evaluate_memorization(generator: Any, order: Any, step: int, *, batch_size: int = 1024,
                          sample: int | None = None, seed: int = 0, prompt_len: int = 32,
                          gen_len: int = 32, chunk: int = 4096) -> MemorizationResult:
    """Memorization of checkpoint ``step`` over the rows it has seen in ``order`` (an
    ``Order`` of ``pythia_jax.data.orders``: ``read_row_indices(rows) -> [n, seq_len + 1]``)."""
    rows = select_rows(step, batch_size=batch_size, sample=sample, seed=seed, num_rows=len(order))
    parts = []
    for s in range(0, len(rows), chunk):
        idx = rows[s:s + chunk]
        seqs = np.asarray(order.read_row_indices(idx))[:, :prompt_len + gen_len]
        parts.append(memorization_scores(generator, seqs, idx, prompt_len=prompt_len, gen_len=gen_len).per_row)
    per_row = np.concatenate(parts) if parts else np.zeros(0, ROW_DTYPE)
    return MemorizationResult(per_row=per_row, prompt_len=prompt_len, gen_len=gen_len)
