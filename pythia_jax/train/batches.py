"""The trainer's batches: the training iterator, the held-out batches, the evaluation, and the
row transform's per-step statistics (all by global step; this process's rows of each batch)."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import jax
import numpy as np

from pythia_jax.config import ConfigError
from pythia_jax.train.config import TrainConfig
from pythia_jax.train.paths import local_output_dir


def cache_prefix(cfg: TrainConfig, prefix: str) -> str:
    cache_dir = cfg.data.cache_dir or os.path.join(local_output_dir(cfg.output_dir), "index_maps")
    return os.path.join(cache_dir, os.path.basename(prefix))


def make_data_iterator(cfg: TrainConfig, setup, start_step: int = 0):
    """This process's training batches by global step (a checkpointable grain iterator)."""
    from pythia_jax.data.pipeline import host_row_range, make_train_iterator

    prefix = cfg.data.resolved_prefix()
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(cache_prefix(cfg, prefix)), exist_ok=True)
    return make_train_iterator(
        prefix, order=cfg.data.order, seq_len=cfg.seq_length, global_batch=cfg.global_batch,
        seed=cfg.data.seed, train_iters=cfg.num_steps, start_step=start_step,
        host_rows=host_row_range(setup.batch_shardings["inputs"], cfg.global_batch),
        num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch,
        cache_prefix=cache_prefix(cfg, prefix), transform=cfg.data.transform_spec(),
        vocab_size=cfg.model.vocab_size)


def make_eval_batches(cfg: TrainConfig, setup) -> Iterator[dict]:
    """Held-out batches of ``global_batch`` rows (this process's rows of each)."""
    from pythia_jax.data import pipeline

    prefix = cfg.data.resolved_prefix()
    eval_prefix = cfg.data.resolved_eval_prefix()
    a, b = pipeline.host_row_range(setup.batch_shardings["inputs"], cfg.global_batch)
    common = dict(seq_len=cfg.seq_length, batch_size=cfg.global_batch, max_batches=cfg.eval_batches,
                  seed=cfg.data.seed, train_iters=cfg.num_steps, global_batch=cfg.global_batch,
                  vocab_size=cfg.model.vocab_size)
    if eval_prefix is not None:
        batches = pipeline.make_eval_batches(eval_prefix, order="sequential", **common)
    else:
        batches = pipeline.make_eval_batches(prefix, order=cfg.data.order,
                                             cache_prefix=cache_prefix(cfg, prefix), **common)
    for batch in batches:  # the full global batch on every host: keep this host's rows
        yield {k: v[a:b] for k, v in batch.items()}


def evaluate(setup, params, batches: Iterable[dict]) -> float:
    """Mean held-out token loss (float) over ``batches`` (all queued, then read back once)."""
    outs = jax.device_get([setup.eval_step(params, setup.put_batch(batch)) for batch in batches])
    total = sum(float(out["loss_sum"]) for out in outs)
    count = sum(float(out["tokens"]) for out in outs)
    if count == 0:
        raise ConfigError("the evaluation set is empty")
    return total / count


def transform_changes(data_it, step: int) -> tuple[int, int] | None:
    """(rows, tokens) the row transform changed in ``step``'s global batch, or None when the step
    was not transformed. Multi-process: summed over the hosts (one small all-gather, only for
    steps inside the transform's window)."""
    stats = data_it.pop_transform_stats(step) if hasattr(data_it, "pop_transform_stats") else None
    source = getattr(data_it, "source", None)
    if source is None or not source.transforms_step(step):
        return None
    counts = np.array([stats.rows_changed, stats.tokens_changed] if stats else [0, 0], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(0)
    return int(counts[0]), int(counts[1])

