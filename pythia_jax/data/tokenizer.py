"""The Pythia tokenizer (GPT-NeoX-20B BPE, 50,277 ids; ``<|endoftext|>`` = 0 is the EOD token).

``load_tokenizer()`` returns a ``tokenizers.Tokenizer`` from the bundled
``pythia_jax/assets/gpt-neox-20b-tokenizer.json`` (no download). ``encode(text)`` gives the ids
GPT-NeoX's ``HFTokenizer.tokenize`` gave (``tokenizer.encode(text).ids``); ``decode(ids)`` the text.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

from pythia_jax.data import _ASSETS

TOKENIZER_FILE = os.path.join(_ASSETS, "gpt-neox-20b-tokenizer.json")


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None):
    """The bundled Pythia tokenizer (or the ``tokenizer.json`` at ``path``), cached."""
    from tokenizers import Tokenizer

    from pythia_jax.errors import DataError
    path = path or TOKENIZER_FILE
    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise DataError(f"{path}: not a tokenizer file of the Hugging Face tokenizers library "
                        f"(tokenizer.json): {' '.join(str(e).split())}") from None


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (no EOD appended)."""
    return load_tokenizer().encode(text).ids


def decode(ids: Sequence[int]) -> str:
    """Text of token ids (special tokens such as EOD kept, so document boundaries show)."""
    return load_tokenizer().decode([int(i) for i in ids], skip_special_tokens=False)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet (openai/gpt-2 ``encoder.py``, ``bytes_to_unicode``), which
    the GPT-NeoX-20B tokenizer's ``ByteLevel`` pre-tokenizer/decoder uses: byte -> one character."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
