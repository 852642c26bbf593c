"""Greedy and sampled generation with the model's KV cache, jitted end to end.

Prompts of different lengths are left-padded into one batch (``key_mask`` hides the padding,
``positions`` count only real tokens, so every row sees exactly what it would see alone). One
forward pass fills the cache with the prompts, then a ``lax.while_loop`` decodes one token per
step until ``max_new_tokens`` or until every row has stopped. Each row stops on its own: at the
stop token (EOD, not kept) or after any token of a ``stop_after`` set (kept): ``generate_until``
uses that set for stop *strings* (every token whose text contains one), so a batch of prompts
ends as soon as each row has written, say, a newline, and the text is then cut at the first stop
string exactly as lm-evaluation-harness's ``generate_until`` cuts it.
Compilation is keyed by (batch, padded prompt length, max_new_tokens, sampling settings, whether a
``stop_after`` set is given); prompt lengths are bucketed (``runtime.next_bucket``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pythia_jax.config import EOD_TOKEN_ID
from pythia_jax.errors import PythiaJaxError
from pythia_jax.eval.runtime import PlacedModel, next_bucket, place_model
from pythia_jax.model import check_id_range
from pythia_jax.sharding import replicated

logger = logging.getLogger(__name__)


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
    # the max subtracted first: a tiny temperature sends the others to -inf, never inf - inf = NaN
    logits = logits.astype(jnp.float32)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / sampling.temperature
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


def _generate_fn(placed: PlacedModel, max_new: int, sampling: SamplingConfig, stop_token: int | None,
                 has_stop_after: bool):
    from pythia_jax.model import init_kv_cache

    config = placed.config

    def run(params, tokens, prompt_mask, rng, stop_after):
        """tokens int32 [B, P] left-padded, prompt_mask bool [B, P], stop_after bool [V] (or None)
        -> new tokens int32 [B, max_new], number of valid new tokens int32 [B]."""
        model = placed.build(params)
        B, P = tokens.shape
        S = P + max_new
        key_mask = jnp.concatenate([prompt_mask, jnp.ones((B, max_new), bool)], axis=1)
        positions = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=1) - 1, 0)
        cache = init_kv_cache(config, B, S, dtype=jnp.dtype(config.dtype))
        logits, cache = model(tokens, positions=positions, key_mask=key_mask, cache=cache)
        next_pos = jnp.sum(prompt_mask.astype(jnp.int32), axis=1)  # [B]

        def advance(tok, done, lengths):
            """Count ``tok`` for rows still running; a row stops at the stop token (not counted)
            or after a ``stop_after`` token (counted)."""
            hit_excl = (tok == stop_token) if stop_token is not None else jnp.zeros_like(done)
            hit_incl = stop_after[tok] if has_stop_after else jnp.zeros_like(done)
            lengths = lengths + jnp.where(done | hit_excl, 0, 1)
            return done | hit_excl | hit_incl, lengths

        rng, sub = jax.random.split(rng)
        first = sample_logits(logits[:, -1], sub, sampling)
        out = jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(first)
        done, lengths = advance(first, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))

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
            done, lengths = advance(tok, done, lengths)
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

        self._stop_masks: dict[tuple[int, tuple[str, ...]], np.ndarray] = {}

    @functools.lru_cache(maxsize=32)  # noqa: B019 - keeps <= 32 generators alive; a run makes few
    def _fn(self, max_new: int, sampling: SamplingConfig, stop_token: int | None, has_stop_after: bool):
        return _generate_fn(self.placed, max_new, sampling, stop_token, has_stop_after)

    def stop_string_tokens(self, tokenizer: Any, stops: Sequence[str]) -> np.ndarray:
        """bool [vocab_size]: the token ids whose decoded text contains one of ``stops``.

        After such a token the text is cut at (or before) its end, so generation of that row can
        stop there without changing the cut text. Byte-level BPE decodes each token's bytes the
        same alone as in context for ASCII stop strings; for others, a token whose bytes are only
        part of a character decodes to U+FFFD alone and is left out (generation then runs on, and
        the text is cut afterwards as usual). Cached per (tokenizer, stops).
        """
        key = (id(tokenizer), tuple(stops))
        if key not in self._stop_masks:
            V = int(self.config.vocab_size)
            n = min(V, _tokenizer_size(tokenizer))
            ids = [[i] for i in range(n)]
            if hasattr(tokenizer, "decode_batch"):
                texts = tokenizer.decode_batch(ids, skip_special_tokens=False)
            else:
                texts = [tokenizer.decode(x, skip_special_tokens=False) for x in ids]
            mask = np.zeros(V, bool)
            mask[:n] = [any(s and s in t for s in stops) for t in texts]
            self._stop_masks[key] = mask
        return self._stop_masks[key]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 stop_token: int | None = EOD_TOKEN_ID,
                 stop_after: np.ndarray | None = None,
                 max_prompt_len: int | None = None) -> list[list[int]]:
        """New tokens for each prompt: up to ``max_new_tokens``, cut before the first
        ``stop_token`` (None: no stop token) and after the first token ``t`` with
        ``stop_after[t]`` (bool [vocab_size], e.g. ``stop_string_tokens``; None: none). Each row
        stops on its own; the batch ends when every row has stopped.

        Prompts are sorted by length and run ``batch_size`` at a time, left-padded to a common
        bucket length; greedy results equal those of each prompt alone.

        The whole prompt is used, as Hugging Face ``generate`` uses it: the KV cache holds prompt
        + new tokens, also past ``max_position_embeddings`` (rotary positions have no hard limit;
        a warning says how many rows run past the trained context). ``max_prompt_len``: keep only
        the last that many tokens of each prompt (lm-evaluation-harness's left truncation for
        ``generate_until``); the cut prompts are counted in ``self.truncated`` and logged.
        Token ids outside ``[0, vocab_size)`` raise ``TokenIdError`` before anything runs.
        """
        if max_new_tokens < 1:
            raise PythiaJaxError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_prompt_len is not None and max_prompt_len < 1:
            raise PythiaJaxError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise PythiaJaxError(f"prompt {i} is empty")
        if prompts:  # checked once for all prompts, before anything runs
            lo, hi = min(int(min(p)) for p in prompts), max(int(max(p)) for p in prompts)
            check_id_range(lo, hi, int(self.config.vocab_size), f"token ids of the {len(prompts)} prompt(s)")
        kept = [len(p) if max_prompt_len is None else min(len(p), max_prompt_len) for p in prompts]
        cut = sum(k < len(p) for k, p in zip(kept, prompts))
        if cut:
            self.truncated += cut
            logger.warning("%d of %d prompts were cut from the left to their last %d tokens",
                           cut, len(prompts), max_prompt_len)
        beyond = sum(k + max_new_tokens > self.max_len for k in kept)
        if beyond:
            logger.warning("%d of %d prompts + %d new tokens run past the model's %d trained positions "
                           "(max_position_embeddings)", beyond, len(prompts), max_new_tokens, self.max_len)
        room = max(self.max_len - max_new_tokens, 1) if max_prompt_len is None else max_prompt_len
        has_stop_after = stop_after is not None and bool(np.any(stop_after))
        if has_stop_after:
            stop_after = np.asarray(stop_after, bool)
            if stop_after.shape != (int(self.config.vocab_size),):
                raise PythiaJaxError(f"stop_after must be bool [{self.config.vocab_size}], got shape "
                                     f"{stop_after.shape}")
            stop_arr = jax.device_put(stop_after, replicated(self.placed.mesh))
        else:
            stop_arr = None
        fn = self._fn(int(max_new_tokens), sampling, stop_token, has_stop_after)
        results: list[list[int]] = [[] for _ in prompts]
        B = self.batch_size
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        rng = jax.random.key(seed)
        for start in range(0, len(order), B):
            idx = order[start:start + B]
            rows = []
            for i in idx:
                p = [int(t) for t in prompts[i]]
                if max_prompt_len is not None:
                    p = p[-max_prompt_len:]
                rows.append(p)
            longest = max(len(p) for p in rows)
            P = next_bucket(longest, self.min_bucket, max(room, longest))
            tokens = np.zeros((B, P), np.int32)
            mask = np.zeros((B, P), bool)
            for r, p in enumerate(rows):
                tokens[r, P - len(p):] = p
                mask[r, P - len(p):] = True
            mask[len(rows):, -1] = True  # filler rows: one real token so nothing is fully masked
            rng, sub = jax.random.split(rng)
            out, lengths = fn(self.placed.params, self.placed.put_batch(tokens),
                              self.placed.put_batch(mask), sub, stop_arr)
            out, lengths = np.asarray(out), np.asarray(lengths)
            for r, i in enumerate(idx):
                results[i] = out[r, :lengths[r]].tolist()
        return results


def _tokenizer_size(tokenizer: Any) -> int:
    """Number of ids the tokenizer can decode (``tokenizers.Tokenizer`` or an HF tokenizer)."""
    if hasattr(tokenizer, "get_vocab_size"):
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` before the first occurrence of each stop string in turn, as lm-evaluation-harness's
    ``generate_until`` does (``for term in until: text = text.split(term)[0]``)."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


def generate_until(generator: Generator, tokenizer: Any, prompts: Sequence[Sequence[int]],
                   until: Sequence[str], max_new_tokens: int, *,
                   sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                   stop_token: int | None = EOD_TOKEN_ID) -> list[str]:
    """Generate for a batch of token prompts and return each continuation's text cut at the stop
    strings ``until``.

    Rows stop independently: at ``stop_token`` or after the first token whose text contains a
    stop string (``Generator.stop_string_tokens``); the decoded text (special tokens skipped) is
    then cut with ``cut_at_stops``. A stop string split over two tokens is cut the same way after
    generation, so the text equals that of generating ``max_new_tokens`` tokens and cutting.
    As lm-evaluation-harness does, a prompt keeps only its last ``max_position_embeddings -
    max_new_tokens`` tokens (counted in ``generator.truncated`` and logged).
    """
    if max_new_tokens >= generator.max_len:
        raise PythiaJaxError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                             f"{generator.max_len}-token window")
    until = [u for u in until if u]
    stop_after = generator.stop_string_tokens(tokenizer, until) if until else None
    outs = generator.generate(prompts, max_new_tokens, sampling=sampling, seed=seed,
                              stop_token=stop_token, stop_after=stop_after,
                              max_prompt_len=generator.max_len - max_new_tokens)
    return [cut_at_stops(tokenizer.decode(o, skip_special_tokens=True), until) for o in outs]


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
