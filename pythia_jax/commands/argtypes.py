"""argparse ``type=`` helpers shared by every subcommand: one place that validates numeric flags
(and text flags: ``text`` refuses bytes that are not UTF-8).

Each helper turns the flag's text into a number or raises ``argparse.ArgumentTypeError``, which
argparse prints as one line (``argument --batch-size: expected a positive integer, got '0'``) with
exit status 2 before any work starts.
"""

from __future__ import annotations

import argparse
import math


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, lengths, counts of steps or rows)."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0 (step numbers, counts where 0 means "off"; seeds take ``seed``)."""
    value = _int(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def seed(text: str) -> int:
    """A seed: an integer in [0, 2**32 - 1] (numpy's ``RandomState`` range, which the GPT-NeoX
    order's shuffles use; every seed flag takes the same range)."""
    from pythia_jax.data.neox_order import MAX_SEED

    value = _int(text, "an integer in [0, 2**32 - 1]")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32 - 1] = [0, {MAX_SEED}], got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (e.g. a sampling temperature; 0 = greedy)."""
    value = _float(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (e.g. nucleus sampling mass; 1 = off)."""
    value = _float(text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def dataset_prefix(text: str) -> str:
    """An indexed-dataset prefix; ``demo`` (the gin alias of ``DataConfig.prefix``) is the bundled
    demo training data."""
    if text == "demo":
        from pythia_jax.data import demo_data_prefix
        return demo_data_prefix()
    return text


def text(value: str) -> str:
    """Text as given, refused when it is not UTF-8: the shell passed bytes that do not decode
    (Python keeps them as lone surrogates, which the tokenizer and the output writers reject later
    with a traceback, e.g. a Latin-1 ``caf\\xe9``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        shown = value.encode("utf-8", "surrogateescape")[: e.start + 8]
        raise argparse.ArgumentTypeError(f"{shown!r}…: not UTF-8 text (byte {e.start}); pass UTF-8, as the "
                                         "terminal's locale or $'\\u00e9' writes it") from None
    return value
