"""Greedy and sampled generation with the model's KV cache, jitted end to end.

Prompts of different lengths are left-padded into one batch (``key_mask`` hides the padding,
``positions`` count only real tokens, so every row sees exactly what it would see alone). One
forward pass fills the cache with the prompts, then a ``lax.while_loop`` decodes one token per
step until ``max_new_tokens`` or until every row has produced the stop token (EOD).
Compilation is keyed by (batch, padded prompt length, max_new_tokens, sampling settings); prompt
lengths are bucketed (``runtime.next_bucket``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pythia_jax.config import EOD_TOKEN_ID
from pythia_jax.errors import PythiaJaxError
from pythia_jax.eval.runtime import PlacedModel, next_bucket, place_model


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; ``top_k`` 0 = off; ``top_p`` 1.0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise PythiaJaxError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise PythiaJaxError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise PythiaJaxError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next tokens int32 [B] from logits float32 [B, V]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k > 0:
        k = min(sampling.top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = before < sampling.top_p  # always keeps the most likely token
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _generate_fn(placed: PlacedModel, max_new: int, sampling: SamplingConfig, stop_token: int | None):
    from pythia_jax.model import init_kv_cache

    config = placed.config

    def run(params, tokens, prompt_mask, rng):
        """tokens int32 [B, P] left-padded, prompt_mask bool [B, P] -> new tokens int32 [B, max_new],
        number of valid new tokens int32 [B]."""
        model = placed.build(params)
        B, P = tokens.shape
        S = P + max_new
        key_mask = jnp.concatenate([prompt_mask, jnp.ones((B, max_new), bool)], axis=1)
        positions = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=1) - 1, 0)
        cache = init_kv_cache(config, B, S, dtype=jnp.dtype(config.dtype))
        logits, cache = model(tokens, positions=positions, key_mask=key_mask, cache=cache)
        next_pos = jnp.sum(prompt_mask.astype(jnp.int32), axis=1)  # [B]
        rng, sub = jax.random.split(rng)
        first = sample_logits(logits[:, -1], sub, sampling)
        out = jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(first)
        done = (first == stop_token) if stop_token is not None else jnp.zeros((B,), bool)
        lengths = jnp.where(done, 0, 1) if stop_token is not None else jnp.ones((B,), jnp.int32)

        def cond(carry):
            i, _, _, done, _, _ = carry
            return (i < max_new) & ~jnp.all(done)

        def body(carry):
            i, cache, out, done, lengths, rng = carry
            prev = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [B, 1]
            pos = (next_pos + i - 1)[:, None]
            logits, cache = model(prev, positions=pos, key_mask=key_mask, cache=cache)
            rng, sub = jax.random.split(rng)
            tok = sample_logits(logits[:, 0], sub, sampling)
            tok = jnp.where(done, stop_token if stop_token is not None else 0, tok)
            out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
            if stop_token is not None:
                lengths = lengths + jnp.where(done | (tok == stop_token), 0, 1)
                done = done | (tok == stop_token)
            else:
                lengths = lengths + 1
            return i + 1, cache, out, done, lengths, rng

        carry = (jnp.ones((), jnp.int32), cache, out, done, lengths, rng)
        _, _, out, _, lengths, _ = jax.lax.while_loop(cond, body, carry)
        return out, lengths

    return jax.jit(run)


class Generator:
    """Generates continuations of token prompts with one model (compilations are reused).

    Args:
      model: a ``GPTNeoX`` or a ``PlacedModel``.
      batch_size: rows per call (rounded up to a multiple of the mesh's data shards).
      min_bucket: the smallest padded prompt length.
    """

    def __init__(self, model: Any, *, batch_size: int = 8, min_bucket: int = 8, mesh=None):
        self.placed = model if isinstance(model, PlacedModel) else place_model(model, mesh)
        self.config = self.placed.config
        self.max_len = int(self.config.max_position_embeddings)
        self.batch_size = self.placed.round_batch(batch_size)
        self.min_bucket = min_bucket
        self.truncated = 0

    @functools.lru_cache(maxsize=32)
    def _fn(self, max_new: int, sampling: SamplingConfig, stop_token: int | None):
        return _generate_fn(self.placed, max_new, sampling, stop_token)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 stop_token: int | None = EOD_TOKEN_ID) -> list[list[int]]:
        """New tokens for each prompt: up to ``max_new_tokens``, cut before the first
        ``stop_token`` (None: always exactly ``max_new_tokens``).

        Prompts longer than ``max_position_embeddings - max_new_tokens`` keep their last tokens
        (``self.truncated`` counts them).
        """
        if max_new_tokens < 1:
            raise PythiaJaxError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens >= self.max_len:
            raise PythiaJaxError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                                 f"{self.max_len}-token window")
        room = self.max_len - max_new_tokens
        fn = self._fn(int(max_new_tokens), sampling, stop_token)
        results: list[list[int]] = [[] for _ in prompts]
        B = self.batch_size
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        rng = jax.random.key(seed)
        for start in range(0, len(order), B):
            idx = order[start:start + B]
            rows = []
            for i in idx:
                p = [int(t) for t in prompts[i]]
                if not p:
                    raise PythiaJaxError(f"prompt {i} is empty")
                if len(p) > room:
                    self.truncated += 1
                    p = p[-room:]
                rows.append(p)
            P = next_bucket(max(len(p) for p in rows), self.min_bucket, room)
            tokens = np.zeros((B, P), np.int32)
            mask = np.zeros((B, P), bool)
            for r, p in enumerate(rows):
                tokens[r, P - len(p):] = p
                mask[r, P - len(p):] = True
            mask[len(rows):, -1] = True  # filler rows: one real token so nothing is fully masked
            rng, sub = jax.random.split(rng)
            out, lengths = fn(self.placed.params, self.placed.put_batch(tokens),
                              self.placed.put_batch(mask), sub)
            out, lengths = np.asarray(out), np.asarray(lengths)
            for r, i in enumerate(idx):
                results[i] = out[r, :lengths[r]].tolist()
        return results


def generate_no_cache(model: Any, prompt: Sequence[int], max_new_tokens: int,
                      stop_token: int | None = EOD_TOKEN_ID) -> list[int]:
    """Greedy decoding that recomputes the whole prefix every step, without a cache (a slow
    reference). The prefix is right-padded to the model's window, which cannot change a causal
    model's logits at the real positions, so one compilation serves every step."""
    window = int(model.config.max_position_embeddings)
    tokens = [int(t) for t in prompt]
    if len(tokens) + max_new_tokens > window:
        raise PythiaJaxError("prompt + max_new_tokens exceed the window")
    fwd = jax.jit(lambda t, n: jnp.argmax(model(t)[0, n - 1]))
    new: list[int] = []
    for _ in range(max_new_tokens):
        padded = np.zeros((1, window), np.int32)
        padded[0, :len(tokens)] = tokens
        tok = int(fwd(padded, len(tokens)))
        if stop_token is not None and tok == stop_token:
            break
        new.append(tok)
        tokens.append(tok)
    return new
