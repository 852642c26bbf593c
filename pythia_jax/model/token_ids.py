"""The host-side check that token ids fit the model's vocabulary.

Inside jit an out-of-range id cannot raise: ``jnp.take`` fills the embedding row with NaN (ids
>= vocab_size) or wraps negative ids around, so every result is silently wrong. The check runs on
concrete arrays at the boundaries where token ids enter a model (the forward on a concrete array,
the scorer's requests, the generator's prompts, memorization rows); traced arrays pass unchecked.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from pythia_jax.errors import TokenIdError


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
