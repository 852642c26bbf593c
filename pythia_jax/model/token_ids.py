"""The checks of a model's token input: its shape and dtype, the decoding cache's room, and (on the
host) that the ids fit the model's vocabulary.

Inside jit an out-of-range id cannot raise: ``jnp.take`` fills the embedding row with NaN (ids
>= vocab_size) or wraps negative ids around, so every result is silently wrong. The check runs on
concrete arrays at the boundaries where token ids enter a model (the forward on a concrete array,
the scorer's requests, the generator's prompts, memorization rows); traced arrays pass unchecked.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from pythia_jax.errors import DataError, TokenIdError


def token_id_range(tokens: Any) -> tuple[int, int] | None:
    """(min, max) of a concrete array or (nested) sequence of ids; None when empty, traced or
    spread over other hosts."""
    if isinstance(tokens, jax.core.Tracer):
        return None
    if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
        return None
    # on the host, also for a device array: a concrete array closed over inside a jit trace would
    # turn ``tokens.min()`` into a tracer (token arrays are small; this copy is cheap)
    arr = np.asarray(tokens)
    if arr.size == 0:
        return None
    return int(arr.min()), int(arr.max())


def check_id_range(lo: int, hi: int, vocab_size: int, what: str = "token ids") -> None:
    """``TokenIdError`` unless ``0 <= lo`` and ``hi < vocab_size`` (``what``: the ids' owner)."""
    if lo < 0 or hi >= vocab_size:
        raise TokenIdError(f"{what} lie outside the model's vocabulary: ids from {lo} to {hi}, but "
                           f"vocab_size is {vocab_size} (valid ids 0..{vocab_size - 1})")


def check_token_ids(tokens: Any, vocab_size: int, what: str = "token ids") -> None:
    """``TokenIdError`` when a concrete ``tokens`` (array or nested sequence) holds an id outside
    ``[0, vocab_size)``; traced arrays (inside jit) and empty inputs pass unchecked."""
    rng = token_id_range(tokens)
    if rng is not None:
        check_id_range(rng[0], rng[1], int(vocab_size), what)


def check_model_input(tokens: Any, vocab_size: int, cache=None):
    """``tokens`` as an array the model takes, after the checks a forward pass needs.

    tokens: int [B, T] (a jax or numpy array; a nested sequence or another library's tensor is
    converted with ``numpy.asarray``). cache: the ``KVCache`` the call decodes into, or None.
    Raises ``DataError`` (one line) for a shape other than [B, T] with B, T >= 1, a non-integer
    dtype (bool included), a cache made for another batch size, or new tokens that do not fit the
    cache (``cache.index + T > cache.max_len``: the write would be clamped and overwrite the last
    slots, so every later logit would be wrong; checked when the index is concrete, i.e. outside
    ``jit``; inside ``jit`` the forward returns NaN instead, ``GPTNeoX._hidden``); ``TokenIdError``
    for ids outside ``[0, vocab_size)`` (concrete arrays only, see ``check_token_ids``).
    """
    if not isinstance(tokens, (jax.Array, np.ndarray)):  # tracers are jax.Arrays too
        try:
            tokens = np.asarray(tokens)
        except Exception as e:  # noqa: BLE001 - one message for any unconvertible input
            raise DataError(f"tokens of type {type(tokens).__name__} cannot be read as an int array [batch, seq]: "
                            f"{e}") from None
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise DataError(f"tokens have shape {tuple(tokens.shape)}; expected int [batch, seq] with at least one "
                        "row and one token (add a batch axis: tokens[None])")
    if tokens.dtype == bool or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"tokens have dtype {tokens.dtype}; expected integer token ids (e.g. int32)")
    if cache is not None:
        B, T = tokens.shape
        if cache.valid.shape[0] != B:
            raise DataError(f"the KV cache holds {cache.valid.shape[0]} rows but tokens have {B}; "
                            "make the cache with init_kv_cache(config, batch=B, ...)")
        index = None if isinstance(cache.index, jax.core.Tracer) else int(cache.index)
        if T > cache.max_len or (index is not None and index + T > cache.max_len):
            at = "" if index is None else f" at slot {index}"
            raise DataError(f"{T} new tokens{at} do not fit the KV cache of max_len {cache.max_len}; make "
                            "the cache with a larger max_len (init_kv_cache)")
    check_token_ids(tokens, vocab_size)
    return tokens
