"""Memorization as the Pythia paper measured it (Biderman et al. 2023, "Pythia: A Suite for
Analyzing Large Language Models Across Training and Scaling", Section 4.2 / Appendix on
memorization; following Carlini et al. 2021's k-extractability with k = 32).

A training row ``i`` (in training order) is scored by prompting with its tokens ``[0, 32)`` and
greedily decoding 32 tokens, never stopping early (the true continuation may hold EOD):
``score = (number of positions j in [0, 32) where generated[j] == row[32 + j]) / 32`` (a value
k/32), and the row is *memorized* when ``score == 1``. A checkpoint saved after ``s`` steps is
scored on every row it has seen, ``[0, s·global_batch)`` of the run's exact order (1,024·s for
Pythia), or on a random sample of them (``sample``).

The rows are read as the run read them (``pythia_jax.data.run_data.RunData``: source, order,
seed, batch, sequence length, ``train_iters``, transform, from the checkpoints' run record).

A sweep (``sweep_memorization``) is chunked and resumable: the selected rows are cut into chunks
of ``chunk_rows``; each chunk's per-row results go to its own ``chunk-NNNNNN.npy`` (written aside,
then renamed) in ``<details>/step<N>_memorization.parts/`` beside a ``manifest.json`` naming the
weights scored (``weights``), the run's rows and the selection; a rerun skips finished chunks, and
a folder of other weights, rows or settings is refused. ``num_hosts``/``host_index`` split
the chunks (chunk c belongs to host ``c % num_hosts``); the merge is a run with the part files of
every host in one folder (a shared file system, or copied together: names never collide): it
finds every chunk done and writes the merged ``step<N>_memorization.npy`` (ROW_DTYPE, sorted by
row). Numerics: the model runs in its configured compute dtype (``ModelConfig.dtype``, float32
unless set), with the KV cache; the original evaluation generated in fp16 without a cache, so
rows whose greedy choice is a near-tie can differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import numpy as np

from pythia_jax.errors import DataError
from pythia_jax.eval.zero_shot import mean_stderr

logger = logging.getLogger(__name__)

PROMPT_LEN = 32
GEN_LEN = 32
ROW_DTYPE = np.dtype([("row", np.int64), ("score", np.float32), ("memorized", np.bool_),
                      ("matched", np.int16)])
MANIFEST_VERSION = 2  # 2: the manifest names the weights scored (1 did not: its chunks are refused)
DEFAULT_CHUNK_ROWS = 65536


class MemorizationError(DataError):
    """Bad memorization input or a details folder made for other rows."""


@dataclasses.dataclass
class MemorizationResult:
    """``per_row``: structured array of ROW_DTYPE: ``row`` int64 (index in the training order),
    ``score`` float32 (matched/gen_len, k/32), ``memorized`` bool (score == 1), ``matched`` int16."""

    per_row: np.ndarray
    prompt_len: int = PROMPT_LEN
    gen_len: int = GEN_LEN

    def summary(self) -> dict[str, tuple[float, float]]:
        """``score``: mean score (stderr); ``memorized``: memorized fraction (stderr);
        ``num_memorized``: count of memorized rows (stderr NaN)."""
        nan = float("nan")
        if len(self.per_row) == 0:
            return {"score": (nan, nan), "memorized": (nan, nan), "num_memorized": (0.0, nan)}
        m = self.per_row["memorized"].astype(np.float64)
        s = self.per_row["score"].astype(np.float64)
        return {"score": (float(s.mean()), _stderr(s)),
                "memorized": (float(m.mean()), _stderr(m)),
                "num_memorized": (float(m.sum()), nan)}

    def save(self, path: str | os.PathLike) -> str:
        """Write ``per_row`` as ``.npy`` (aside, then renamed); returns the path."""
        return _save_npy(os.fspath(path), self.per_row)


def _stderr(x: np.ndarray) -> float:
    if len(x) < 100_000:
        return mean_stderr(x.tolist())
    return float(x.std(ddof=1) / np.sqrt(len(x)))


def _save_npy(path: str, array: np.ndarray) -> str:
    from pythia_jax.io_utils import atomic_files

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with atomic_files(path) as (tmp,), open(tmp, "wb") as f:
        np.save(f, array)
    return path


def select_rows(step: int, *, batch_size: int, sample: int | None = None, seed: int = 0,
                num_rows: int | None = None) -> np.ndarray:
    """Rows to score for ``step``: all seen rows ``[0, batch_size·step)`` (int64, ascending), or
    ``sample`` of them drawn without replacement (sorted; the same seed gives the same draw).
    Raises ``DataError`` when the order holds fewer than ``num_rows`` rows."""
    n = batch_size * step
    if num_rows is not None and n > num_rows:
        raise DataError(f"step {step} has seen {n} rows but the data order has only {num_rows}")
    if sample is None or sample >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=sample, replace=False)).astype(np.int64)


def memorization_scores(generator: Any, sequences: np.ndarray, rows: Sequence[int] | None = None, *,
                        prompt_len: int = PROMPT_LEN, gen_len: int = GEN_LEN) -> MemorizationResult:
    """Greedy-decode ``gen_len`` tokens after the first ``prompt_len`` tokens of each sequence
    (int [n, >= prompt_len + gen_len]) and score them against the true next tokens.

    ``generator``: a ``pythia_jax.eval.generate.Generator``; decoding never stops early.
    Raises ``DataError`` for rows shorter than ``prompt_len + gen_len``, ``TokenIdError`` for ids
    outside the model's vocabulary.
    """
    sequences = np.asarray(sequences)
    if sequences.ndim != 2 or sequences.shape[1] < prompt_len + gen_len:
        raise DataError(f"memorization needs rows of at least {prompt_len + gen_len} tokens, "
                        f"got shape {sequences.shape}")
    from pythia_jax.model import check_token_ids  # ids past the vocabulary would never match
    check_token_ids(sequences[:, :prompt_len + gen_len], generator.config.vocab_size,
                    "token ids of the memorization rows")
    prompts = sequences[:, :prompt_len].astype(np.int64)
    truth = sequences[:, prompt_len:prompt_len + gen_len].astype(np.int64)
    out = generator.generate([p.tolist() for p in prompts], gen_len, stop_token=None)
    pred = np.asarray(out, np.int64).reshape(len(sequences), gen_len)
    matched = (pred == truth).sum(axis=1)
    per_row = np.zeros(len(sequences), ROW_DTYPE)
    per_row["row"] = np.arange(len(sequences)) if rows is None else np.asarray(rows, np.int64)
    per_row["matched"] = matched
    per_row["score"] = matched.astype(np.float32) / np.float32(gen_len)
    per_row["memorized"] = matched == gen_len
    return MemorizationResult(per_row=per_row, prompt_len=prompt_len, gen_len=gen_len)


def evaluate_memorization(generator: Any, order: Any, step: int, *, batch_size: int,
                          sample: int | None = None, seed: int = 0, prompt_len: int = PROMPT_LEN,
                          gen_len: int = GEN_LEN, chunk: int = 4096, run: Any = None) -> MemorizationResult:
    """Memorization of checkpoint ``step`` over the rows it has seen in ``order`` (an ``Order``
    of ``pythia_jax.data.orders``), in memory. ``batch_size``: the run's global batch. ``run``:
    the ``RunData`` (applies the run's row transform), None = rows as stored."""
    rows = select_rows(step, batch_size=batch_size, sample=sample, seed=seed, num_rows=len(order))
    parts = [_score_rows(generator, order, run, rows[s:s + chunk], prompt_len, gen_len)
             for s in range(0, len(rows), chunk)]
    per_row = np.concatenate(parts) if parts else np.zeros(0, ROW_DTYPE)
    return MemorizationResult(per_row=per_row, prompt_len=prompt_len, gen_len=gen_len)


def _score_rows(generator, order, run, idx, prompt_len, gen_len) -> np.ndarray:
    if len(idx) == 0:
        return np.zeros(0, ROW_DTYPE)
    seqs = run.read_rows(order, idx) if run is not None else np.asarray(order.read_row_indices(idx))
    return memorization_scores(generator, seqs[:, :prompt_len + gen_len], idx,
                               prompt_len=prompt_len, gen_len=gen_len).per_row


# ------------------------------------------------------------------------------ resumable sweep
def parts_dir(details_dir: str | os.PathLike, step: int) -> str:
    """``<details>/step<N>_memorization.parts``: the manifest and chunk files of one step."""
    return os.path.join(os.fspath(details_dir), f"step{step}_memorization.parts")


def merged_path(details_dir: str | os.PathLike, step: int) -> str:
    """``<details>/step<N>_memorization.npy``: every scored row of the step (ROW_DTYPE)."""
    return os.path.join(os.fspath(details_dir), f"step{step}_memorization.npy")


def chunk_path(folder: str, chunk: int) -> str:
    return os.path.join(folder, f"chunk-{chunk:06d}.npy")


def sweep_memorization(generator: Any, run: Any, step: int, details_dir: str | os.PathLike, *,
                       order: Any = None, sample: int | None = None, sample_seed: int = 0,
                       chunk_rows: int = DEFAULT_CHUNK_ROWS, num_hosts: int = 1, host_index: int = 0,
                       prompt_len: int = PROMPT_LEN, gen_len: int = GEN_LEN,
                       progress: bool = False, weights: str | None = None) -> MemorizationResult | None:
    """Score checkpoint ``step`` on the rows it has seen (all of ``[0, run.rows_seen(step))``, or
    ``sample`` of them), chunk by chunk into ``parts_dir(details_dir, step)``.

    ``run``: the ``RunData`` of the run (``pythia_jax.checkpoint.read_run_data``); ``order``: its opened
    order (default ``run.open_order()``). This host scores the chunks ``c`` with
    ``c % num_hosts == host_index`` that are not done yet. Returns the merged result (also saved
    as ``merged_path``) once every chunk of the step is there, else None (other hosts' chunks
    missing; rerun with ``num_hosts=1`` to merge, which scores anything still missing).
    ``weights``: names the weights scored (``pythia_jax.eval.loading.weights_fingerprint``, as the
    runner passes it); None: a digest of the generator's own parameters (their checksums) and
    configuration. Raises ``MemorizationError`` when the folder holds chunks of other weights,
    rows or settings, or chunks of an older version that did not record the weights.
    """
    if chunk_rows < 1:
        raise MemorizationError(f"chunk rows must be >= 1, got {chunk_rows}")
    if num_hosts < 1 or not 0 <= host_index < num_hosts:
        raise MemorizationError(f"host index {host_index} is not in [0, {num_hosts})")
    order = run.open_order() if order is None else order
    rows = select_rows(step, batch_size=run.global_batch, sample=sample, seed=sample_seed,
                       num_rows=len(order))
    folder = parts_dir(details_dir, step)
    num_chunks = -(-len(rows) // chunk_rows)
    if weights is None:
        weights = generator_weights(generator)
    manifest = {"version": MANIFEST_VERSION, "step": int(step), "weights": weights, "run": run.fingerprint(),
                "rows_seen": run.rows_seen(step), "sample": sample,
                "sample_seed": int(sample_seed) if sample is not None else None,
                "num_rows": int(len(rows)), "chunk_rows": int(chunk_rows), "num_chunks": int(num_chunks),
                "prompt_len": int(prompt_len), "gen_len": int(gen_len)}
    _claim_manifest(folder, manifest)
    mine = [c for c in range(num_chunks) if c % num_hosts == host_index]
    todo = [c for c in mine if not _chunk_ok(folder, c, rows[c * chunk_rows:(c + 1) * chunk_rows])]
    if len(mine) > len(todo):
        logger.info("step %d: %d of this host's %d memorization chunks already done in %s",
                    step, len(mine) - len(todo), len(mine), folder)
    it = todo
    if progress and todo:
        from tqdm import tqdm
        it = tqdm(todo, desc=f"memorization step {step}", unit="chunk")
    for c in it:
        idx = rows[c * chunk_rows:(c + 1) * chunk_rows]
        _save_npy(chunk_path(folder, c), _score_rows(generator, order, run, idx, prompt_len, gen_len))
    missing = [c for c in range(num_chunks)
               if not _chunk_ok(folder, c, rows[c * chunk_rows:(c + 1) * chunk_rows])]
    if missing:
        logger.info("step %d: %d of %d chunks are other hosts' and not done yet; rerun with one host "
                    "once their part files are in %s to merge", step, len(missing), num_chunks, folder)
        return None
    parts = [np.load(chunk_path(folder, c)) for c in range(num_chunks)]
    per_row = np.concatenate(parts) if parts else np.zeros(0, ROW_DTYPE)
    result = MemorizationResult(per_row=per_row, prompt_len=prompt_len, gen_len=gen_len)
    result.save(merged_path(details_dir, step))
    return result


def generator_weights(generator: Any) -> str:
    """``params:`` + a digest of the generator's configuration and the checksums of its
    parameters as placed (one pass over them)."""
    from pythia_jax.checkpoint import tree_checksums
    from pythia_jax.eval.provenance import digest_hex

    placed = generator.placed
    return "params:" + digest_hex({"config": placed.config.to_dict(), "params": tree_checksums(placed.params)})


def _claim_manifest(folder: str, manifest: dict) -> None:
    path = os.path.join(folder, "manifest.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise MemorizationError(f"{path}: unreadable ({e}); remove the folder to start over") from None
        if not isinstance(old, dict) or "weights" not in old:
            raise MemorizationError(
                f"{folder} holds memorization chunks of an older pythia-jax, whose manifest does not say "
                "which weights they scored, so they cannot be reused; use another --details-dir or remove "
                "that folder")
        if old != json.loads(json.dumps(manifest)):
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != json.loads(json.dumps(manifest)).get(k))
            k = "weights" if "weights" in diff else diff[0]
            what = "other weights" if k == "weights" else "other settings"
            # a manifest without chunks: an earlier start was refused (or stopped) before its first
            # chunk; it is kept (another host may be starting under it), but says it can go
            held = ("was started with" if not any(n.startswith("chunk-") for n in os.listdir(folder))
                    else "holds memorization chunks of")
            raise MemorizationError(
                f"{folder} {held} {what} ({k}: {old.get(k)} there, {manifest.get(k)} now); use another "
                "--details-dir or remove that folder")
        return
    os.makedirs(folder, exist_ok=True)
    from pythia_jax.io_utils import write_text_atomic

    write_text_atomic(path, json.dumps(manifest, indent=1))


def _chunk_ok(folder: str, chunk: int, rows: np.ndarray) -> bool:
    path = chunk_path(folder, chunk)
    if not os.path.exists(path):
        return False
    try:
        got = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        logger.warning("%s is unreadable; scoring that chunk again", path)
        return False
    if got.dtype != ROW_DTYPE or len(got) != len(rows) or not np.array_equal(got["row"], rows):
        logger.warning("%s does not hold the rows it should; scoring that chunk again", path)
        return False
    return True
