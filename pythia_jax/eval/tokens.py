"""Text -> token requests, the way lm-evaluation-harness builds them for a causal model.

- ``encode_pair``: trailing spaces of the context move to the continuation; the continuation's
  tokens are those of ``encode(context + continuation)`` after ``len(encode(context))``; an empty
  context becomes ``[EOD]``.
- ``rolling_windows``: the harness's ``get_rolling_token_windows(context_len=1)`` +
  ``make_disjoint_window``: every token is predicted exactly once, in windows of at most
  ``max_len`` tokens, the first conditioned on EOD.
  (An empty context conditions on EOD unless the continuation itself starts with EOD.)
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from pythia_jax.config import EOD_TOKEN_ID


def get_tokenizer() -> Any:
    """The bundled Pythia tokenizer (``pythia_jax.data.tokenizer.load_tokenizer``)."""
    from pythia_jax.data.tokenizer import load_tokenizer

    return load_tokenizer()


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (``tokenizers.Tokenizer`` or an HF tokenizer)."""
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer.encode(text)
    return list(getattr(out, "ids", out))


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(int(i) for i in ids))



def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as the harness's ``_encode_pair``."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        cont = encode(tokenizer, continuation)
        if cont and cont[0] == EOD_TOKEN_ID:
            return cont[:1], cont[1:]
        return [EOD_TOKEN_ID], cont
    whole = encode(tokenizer, context + continuation)
    n_ctx = len(encode(tokenizer, context))
    return whole[:n_ctx], whole[n_ctx:]


def rolling_windows(tokens: Sequence[int], max_len: int,
                    prefix_token: int = EOD_TOKEN_ID) -> Iterator[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows covering ``tokens``; each pair fits ``max_len + 1``."""
    tokens = list(tokens)
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    predicted = 0
    n = len(tokens)
    if n == 0:
        return
    first = min(max_len, n)
    yield [prefix_token], tokens[:first]
    predicted = first
    while predicted < n:
        pred_len = min(n - predicted, max_len)
        end = predicted + pred_len
        context = tokens[max(0, end - max_len - 1): end - 1]
        # make_disjoint_window: keep only the context tokens that are not also predicted here.
        context = context[: len(context) - (pred_len - 1)]
        yield context, tokens[end - pred_len: end]
        predicted = end
