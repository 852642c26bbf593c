"""Batched, jitted log-likelihood of continuations given contexts (the harness's
``loglikelihood`` and ``loglikelihood_rolling``).

Requests are token lists. The model sees ``(context + continuation)[-(max_len + 1):][:-1]``, as
lm-evaluation-harness feeds a causal model, so a context longer than the window is cut from the
left (such requests are counted in ``ScoreResult.truncated``). Requests are sorted by length,
right-padded to a length bucket (powers of two and 1.5x powers of two) and run in batches whose
row count depends only on the bucket (fewer rows for long buckets under ``max_batch_tokens``),
so a whole task compiles once per bucket (a handful of times). The batch axis is
sharded over the mesh.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pythia_jax.errors import PythiaJaxError
from pythia_jax.eval.runtime import PlacedModel, next_bucket, place_model
from pythia_jax.model import check_id_range

logger = logging.getLogger(__name__)

Request = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)


@dataclasses.dataclass
class ScoreResult:
    """Per request: ``loglik`` float64 [N] (sum over continuation tokens), ``is_greedy`` bool [N]
    (every continuation token is the argmax), ``num_tokens`` int [N]; ``truncated``: how many
    requests were cut from the left to fit the window."""

    loglik: np.ndarray
    is_greedy: np.ndarray
    num_tokens: np.ndarray
    truncated: int


def _score_fn(placed: PlacedModel) -> Callable:
    def score(params, tokens, positions, targets, mask):
        """tokens int32 [B, L]; positions/targets int32 [B, C] (the C scored positions of each row
        and the tokens expected there); mask bool [B, C] -> (loglik f32 [B], greedy bool [B]).

        Only the C scored positions go through the output layer and the softmax reductions (C is
        usually much smaller than L; the output layer is the largest matmul of the small models):
        the final hidden states of those positions are gathered first, then projected to float32
        logits [B, C, V] exactly as the model's ``embed_out`` does. A token is greedy when its
        logit equals the row maximum.
        """
        model = placed.build(params)
        B, L = tokens.shape
        hidden = model.hidden_states(tokens).reshape(B, L, -1)
        hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, C, H]
        logits = model.embed_out(hidden.reshape(-1, hidden.shape[-1]), out_dtype=jnp.float32)
        logits = logits.reshape(B, positions.shape[1], -1)  # [B, C, V]
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        top = jnp.max(logits, axis=-1)
        lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
        loglik = jnp.sum(jnp.where(mask, target_logit - lse, 0.0), axis=-1)
        greedy = jnp.all(jnp.where(mask, target_logit >= top, True), axis=-1)
        return loglik, greedy

    return jax.jit(score)


MAX_BATCH_TOKENS = 16384  # default cap on the padded tokens of one scoring batch (long buckets use fewer rows)


class Scorer:
    """Scores token requests with one model; reuse it across tasks to reuse compilations.

    Args:
      model: a ``GPTNeoX`` (NNX module) or a ``PlacedModel`` (``runtime.place_model``).
      batch_size: rows per forward pass (rounded up to a multiple of the mesh size).
      max_len: the window (default: ``config.max_position_embeddings``).
      min_bucket: the smallest padded length.
      max_batch_tokens: long buckets use fewer rows, so that a batch holds at most this many
        padded tokens (the logits of a batch are [rows, length, vocab] float32).
    """

    def __init__(self, model: Any, *, batch_size: int = 16, max_len: int | None = None,
                 min_bucket: int = 32, max_batch_tokens: int = MAX_BATCH_TOKENS, mesh=None):
        self.placed = model if isinstance(model, PlacedModel) else place_model(model, mesh)
        self.config = self.placed.config
        self.max_len = int(max_len or self.config.max_position_embeddings)
        self.batch_size = self.placed.round_batch(batch_size)
        self.min_bucket = min(min_bucket, self.max_len)
        self.max_batch_tokens = int(max_batch_tokens)
        self._score = _score_fn(self.placed)
        self.compiled_shapes: set[tuple[int, int, int]] = set()  # (batch, length, scored positions)
        self.result_shape: tuple[int, ...] = ()  # (K,) when the params are K stacked checkpoints

    def rows_for_length(self, length: int) -> int:
        """Rows per batch for padded ``length``: ``batch_size``, fewer when over the token budget."""
        return self.placed.round_batch(min(self.batch_size, max(1, self.max_batch_tokens // length)))

    def loglikelihood(self, requests: Sequence[Request], progress: bool = False) -> ScoreResult:
        """Sum of log p(continuation | context) per request; see ``ScoreResult``."""
        n = len(requests)
        rows: list[tuple[list[int], int]] = []  # (window tokens incl. the last target, continuation length)
        truncated = 0
        lows, highs = [], []  # the id range of all requests, checked once before any scoring
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = list(ctx), list(cont)
            if not cont:
                raise PythiaJaxError(f"request {i}: empty continuation")
            if len(cont) > self.max_len:
                raise PythiaJaxError(f"request {i}: continuation of {len(cont)} tokens is longer than "
                                     f"the window ({self.max_len})")
            if not ctx:
                raise PythiaJaxError(f"request {i}: empty context (use [EOD] as the harness does)")
            whole = ctx + cont
            lows.append(min(whole))
            highs.append(max(whole))
            if len(whole) > self.max_len + 1:
                truncated += 1
                whole = whole[-(self.max_len + 1):]
            rows.append((whole, len(cont)))
        if rows:
            check_id_range(int(min(lows)), int(max(highs)), int(self.config.vocab_size),
                           f"token ids of the {n} scoring requests")
        if truncated:
            logger.info("%d of %d requests were cut from the left to fit the %d-token window",
                        truncated, n, self.max_len)
        order = sorted(range(n), key=lambda i: -len(rows[i][0]))
        loglik = np.zeros((n,) + self.result_shape, np.float64)  # [N], or [N, K] for K stacked models
        greedy = np.zeros((n,) + self.result_shape, bool)
        batches = []
        s = 0
        while s < n:  # sorted longest first: the first row of a batch fixes its bucket
            L = next_bucket(len(rows[order[s]][0]) - 1, self.min_bucket, self.max_len)
            B = self.rows_for_length(L)
            batches.append((order[s:s + B], L, B))
            s += B
        if progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc="scoring", unit="batch")
        pending = []
        for idx, L, B in batches:
            C = next_bucket(max(rows[i][1] for i in idx), min(8, L), L)
            tokens = np.zeros((B, L), np.int32)
            positions = np.zeros((B, C), np.int32)
            targets = np.zeros((B, C), np.int32)
            mask = np.zeros((B, C), bool)
            for r, i in enumerate(idx):
                whole, n_cont = rows[i]
                m = len(whole) - 1  # input length; inputs whole[:-1] predict whole[1:]
                tokens[r, :m] = whole[:-1]
                positions[r, :n_cont] = np.arange(m - n_cont, m)
                targets[r, :n_cont] = whole[-n_cont:]
                mask[r, :n_cont] = True
            self.compiled_shapes.add((B, L, C))
            put = self.placed.put_batch
            # dispatched without waiting: the host builds the next batch while this one runs
            pending.append((idx, self._score(self.placed.params, put(tokens), put(positions),
                                             put(targets), put(mask))))
        for idx, (ll, gr) in pending:  # one device-to-host read per batch, after all are queued
            ll, gr = np.asarray(ll), np.asarray(gr)
            for r, i in enumerate(idx):
                loglik[i] = ll[..., r]
                greedy[i] = gr[..., r]
        num_tokens = np.array([len(c) for _, c in requests], np.int64)
        return ScoreResult(loglik=loglik, is_greedy=greedy, num_tokens=num_tokens, truncated=truncated)

    def loglikelihood_rolling(self, documents: Sequence[Sequence[int]], progress: bool = False) -> ScoreResult:
        """Log-likelihood of each whole token sequence (first token conditioned on EOD), scored in
        disjoint windows of at most ``max_len`` tokens (the harness's ``loglikelihood_rolling``)."""
        from pythia_jax.eval.tokens import rolling_windows

        requests: list[Request] = []
        owner: list[int] = []
        for d, doc in enumerate(documents):
            if len(doc) == 0:
                raise PythiaJaxError(f"document {d}: no tokens")
            for ctx, cont in rolling_windows(doc, self.max_len):
                requests.append((ctx, cont))
                owner.append(d)
        res = self.loglikelihood(requests, progress=progress)
        owner_arr = np.asarray(owner)
        loglik = np.zeros((len(documents),) + res.loglik.shape[1:], np.float64)
        np.add.at(loglik, owner_arr, res.loglik)
        greedy = np.ones((len(documents),) + res.loglik.shape[1:], bool)
        np.logical_and.at(greedy, owner_arr, res.is_greedy)
        num_tokens = np.array([len(d) for d in documents], np.int64)
        return ScoreResult(loglik=loglik, is_greedy=greedy, num_tokens=num_tokens, truncated=0)
