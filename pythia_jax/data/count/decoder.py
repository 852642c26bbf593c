"""Counting a block of rows: decoding token rows to text (``ByteDecoder``) and ``count_rows``.
"""

from __future__ import annotations

import numpy as np

from pythia_jax.data.count.counters import Key
from pythia_jax.data.count.spec import CountError
from pythia_jax.data.tokenizer import bytes_to_unicode

# --------------------------------------------------------------------------- counting rows


class ByteDecoder:
    """Rows of token ids -> text, vectorised: each id's bytes from a table, one UTF-8 decode per row.

    Gives exactly ``Tokenizer.decode(ids, skip_special_tokens=False)`` of the Pythia tokenizer
    (byte-level BPE: a token is a fixed byte string; added tokens are their content; the
    concatenated bytes are decoded as UTF-8 with U+FFFD replacement; ids outside the vocabulary
    give nothing), which ``tests/test_count.py`` checks for every id and for random rows.
    """

    def __init__(self, tokenizer=None):
        from pythia_jax.data.tokenizer import load_tokenizer

        tok = tokenizer or load_tokenizer()
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
        table = [b""] * (1 << 16)
        for piece, i in tok.get_vocab(with_added_tokens=False).items():
            if i < len(table):
                table[i] = bytes(byte_of[c] for c in piece)
        for i, content in added.items():
            if i < len(table):
                table[i] = content.encode("utf-8")
        self.lens = np.array([len(t) for t in table], dtype=np.int32)  # table < 2 GB: int32
        self.starts = (np.cumsum(self.lens) - self.lens).astype(np.int32)
        self.buf = np.frombuffer(b"".join(table), dtype=np.uint8)

    def __call__(self, rows: np.ndarray) -> list[str]:
        """rows: integer ids [R, W] -> R strings."""
        rows = as_uint16(np.asarray(rows))
        flat = rows.ravel()
        lens = self.lens[flat]
        row_bytes = lens.reshape(rows.shape).sum(axis=1, dtype=np.int64)
        ends = np.cumsum(row_bytes)
        # byte k of the output comes from buf[starts[token] + (k - first output byte of token)]
        shift = self.starts[flat].astype(np.int64) - (np.cumsum(lens, dtype=np.int64) - lens)
        idx = np.repeat(shift, lens) + np.arange(int(ends[-1]) if len(ends) else 0)
        data = self.buf[idx].tobytes()
        return [data[a:b].decode("utf-8", "replace")
                for a, b in zip((ends - row_bytes).tolist(), ends.tolist())]


_DECODER: list = []


def decode_rows(rows: np.ndarray) -> list[str]:
    """Text of each row of ``rows`` [R, W] (as the Pythia tokenizer's ``decode``; special tokens
    such as ``<|endoftext|>`` kept), with ``ByteDecoder``."""
    if not _DECODER:
        _DECODER.append(ByteDecoder())
    return _DECODER[0](rows)


def as_uint16(rows: np.ndarray) -> np.ndarray:
    if rows.dtype == np.uint16:
        return rows
    if rows.size and (rows.min() < 0 or rows.max() >= 1 << 16):
        raise CountError(f"token ids up to {int(rows.max())} do not fit uint16; counting supports "
                         "vocabularies below 65,536 (Pythia's is 50,277)")
    return rows.astype(np.uint16)


def count_rows(counters, rows: np.ndarray, *, locate: bool = False, max_locations: int = 1000):
    """Counts over ``rows`` (uint16 [R, seq_len+1]): ({(term, variant): n}, locations).

    locations: (term, variant, row index in ``rows``, offset) in row order, at most
    ``max_locations`` per key (only with ``locate``).
    """
    rows = as_uint16(np.asarray(rows))
    texts = decode_rows(rows) if any(c.needs_text for c in counters) else None
    counts: dict[Key, int] = {}
    locs: list = []
    for c in counters:
        counts.update(c.count(rows, texts))
        if locate:
            found = c.locate(rows, texts, max_locations)
            if c.offset_unit == "token":
                locs.extend((*loc, "token", loc[-1]) for loc in found)
            else:
                locs.extend((*loc, c.offset_unit, _token_of_char(rows[loc[2]], texts[loc[2]], loc[3]))
                            for loc in found)
    return counts, locs


def _token_of_char(row: np.ndarray, text: str, char_offset: int) -> int:
    """The index of the token of ``row`` whose bytes hold character ``char_offset`` of its decoded
    ``text`` (exact for valid UTF-8; a U+FFFD replacement counts as its 3 bytes)."""
    if not _DECODER:
        _DECODER.append(ByteDecoder())
    byte = len(text[:char_offset].encode("utf-8"))
    ends = np.cumsum(_DECODER[0].lens[as_uint16(row)], dtype=np.int64)
    return int(min(np.searchsorted(ends, byte, side="right"), len(row) - 1))
