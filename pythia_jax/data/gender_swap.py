"""The gender swaps of the Pythia paper's intervention case study, as row transforms.

- ``gender_swap_tokenmap_2022``: the historical token-id map (Dec 2022), flaws included.
- ``gender_swap_text_2023``: the historical decode / replace / re-tokenize / pad-or-truncate.
- ``gender_swap`` (:class:`GenderSwap`): the corrected swap (whole words, every form and case,
  exact row length), both directions, optionally with WinoBias's gendered word pairs.

Each factory returns a ``row -> row`` function; ``pythia_jax.data.transforms`` registers them by
name. Source: Biderman et al. (2023), "Pythia", Section 3.1, and the intervention branches of
EleutherAI/gpt-neox that trained those models.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Callable, Mapping

import numpy as np

from pythia_jax.errors import ConfigError, TransformError

log = logging.getLogger(__name__)

RowTransform = Callable[[np.ndarray], np.ndarray]
PAD_ID = 1  # <|padding|> in the GPT-NeoX-20B tokenizer
_INTERVENTIONS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "interventions")


# ------------------------------------------------------------------------ historical: token map
TOKENMAP_2022 = {754: 1500, 3032: 4058, 8389: 10759, 1328: 2993, 521: 617, 344: 703,
                 779: 617, 8701: 379, 13243: 379, 248: 6689}
"""The Dec 2022 intervention's id map (GPT-NeoX-20B tokenizer): ' He'→' She', ' His'→' Her',
'His'→'Her', 'He'→'She', ' his'→' her', ' he'→' she', ' him'→' her', 'his'→'her', 'him'→'her',
'he'→'she'."""


def gender_swap_tokenmap_2022() -> RowTransform:
    """The historical token-id map, applied to every position of the row (flaws included)."""
    src = np.array(sorted(TOKENMAP_2022), dtype=np.int64)
    dst = np.array([TOKENMAP_2022[int(s)] for s in src], dtype=np.int64)

    def swap(row: np.ndarray) -> np.ndarray:
        out = row.copy()
        pos = np.searchsorted(src, row)
        pos = np.minimum(pos, len(src) - 1)
        hit = src[pos] == row
        out[hit] = dst[pos[hit]].astype(row.dtype)
        return out

    return swap


# --------------------------------------------------------------------- historical: text replace
TEXT_REPLACEMENTS_2023 = ((" he ", " she "), (" him ", " her "), (" his ", " her "),
                          (" He ", " She "), (" Him ", " Her "), (" His ", " Her "))


def gender_swap_text_2023(pad_id: int = PAD_ID) -> RowTransform:
    """The historical text variant: decode, ``str.replace`` each pair in order, re-tokenize, then
    pad with ``pad_id`` or truncate to the row's length (flaws included)."""
    from pythia_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer()

    def swap(row: np.ndarray) -> np.ndarray:
        text = tok.decode([int(i) for i in row], skip_special_tokens=False)
        for old, new in TEXT_REPLACEMENTS_2023:
            text = text.replace(old, new)
        ids = tok.encode(text).ids[: len(row)]
        ids = ids + [pad_id] * (len(row) - len(ids))
        return np.asarray(ids, dtype=row.dtype)

    return swap


# -------------------------------------------------------------------------------- corrected swap
PRONOUNS_M2F = {"he": "she", "him": "her", "his": "her", "himself": "herself"}
PRONOUNS_F2M = {"she": "he", "her": "his", "hers": "his", "herself": "himself"}
_FEMININE = re.compile(r"(wom[ae]n|girl|ess\b|ess'|esses|^she$|^her|queen|lad(y|ies)|mother|^mom|"
                       r"mommy|mommies|sister|daughter|aunt|wife|wives|niece|widow\b|widows|witch|"
                       r"^nuns?$|^brides?$|belle|spinster|^lass|ma'am|^miss$|^mrs\.|^ms\.|female|"
                       r"fiancee|masseuse|heroine|^gals?$|^chicks?$)")


def _is_feminine(word: str) -> bool:
    return bool(_FEMININE.search(word))


@functools.lru_cache(maxsize=1)
def winobias_pairs() -> dict[str, str]:
    """WinoBias's gendered word pairs as a masculine → feminine map (lower case).

    Read from the bundled copies of ``winobias_generalized_swaps.txt`` and
    ``winobias_extra_gendered_words.txt`` (MIT, UCLA NLP). The lists mix both orientations; each
    pair is oriented by which word is feminine. Pronouns are left to the pronoun table.
    """
    out: dict[str, str] = {}
    for fname in ("winobias_extra_gendered_words.txt", "winobias_generalized_swaps.txt"):
        with open(os.path.join(_INTERVENTIONS, fname), encoding="utf-8") as f:
            for line in f:
                parts = [p.strip().lower() for p in line.split("\t")]
                if len(parts) != 2 or not all(parts):
                    continue
                a, b = parts
                fa, fb = _is_feminine(a), _is_feminine(b)
                if fa == fb:
                    continue  # e.g. "chairwomen / chairman" typos: cannot be oriented
                m, fem = (b, a) if fa else (a, b)
                if m in PRONOUNS_M2F or fem in PRONOUNS_F2M:
                    continue
                out.setdefault(m, fem)
    return out


@functools.lru_cache(maxsize=2)
def _vocab_tables(tokenizer_path: str | None = None):
    """Per id: its bytes (special tokens -> b'\\x00', a non-word boundary); bytes -> id; and each
    merged token's two halves (from the BPE merges), for exact-length re-tokenization."""
    from pythia_jax.data.tokenizer import TOKENIZER_FILE
    with open(tokenizer_path or TOKENIZER_FILE, encoding="utf-8") as f:
        spec = json.load(f)
    from pythia_jax.data.tokenizer import bytes_to_unicode

    dec = {c: b for b, c in bytes_to_unicode().items()}
    vocab = spec["model"]["vocab"]
    size = max(vocab.values()) + 1
    for t in spec.get("added_tokens", []):
        size = max(size, t["id"] + 1)
    pieces: list[bytes] = [b"\x00"] * size
    by_bytes: dict[bytes, int] = {}
    for s, i in vocab.items():
        try:
            pieces[i] = bytes(dec[c] for c in s)
        except KeyError:
            continue
        by_bytes.setdefault(pieces[i], i)
    for t in spec.get("added_tokens", []):
        if t.get("special"):
            pieces[t["id"]] = b"\x00"
    halves: dict[int, tuple[int, int]] = {}
    for m in spec["model"].get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in vocab and b in vocab and (a + b) in vocab:
            halves[vocab[a + b]] = (vocab[a], vocab[b])
    return pieces, by_bytes, halves


@functools.lru_cache(maxsize=1)
def _piece_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The vocabulary's pieces as an object array (for gathering a row's bytes) and their lengths,
    built once per process (every ``GenderSwap`` shares them)."""
    pieces = _vocab_tables()[0]
    return np.array(pieces, dtype=object), np.array([len(p) for p in pieces], dtype=np.int64)


class GenderSwap:
    """The corrected swap: whole words, every form and case, exact row length.

    A word is matched on the row's text (the concatenated token pieces) when the characters on
    both sides are not word characters (letters of any script, digits, ``_``); a match starting at byte 0 of
    the row is left alone (the row may start inside a word of the previous row), the row's end
    counts as a word boundary. Case is kept (he→she, He→She, HE→SHE). The tokens covering the
    word are replaced by the same number of tokens spelling the new text: the usual tokenization
    when it has that length, else a shorter one split along the BPE merges, or the fewest-token
    tokenization. When even that is longer (e.g. `` Himself`` is one token, `` Herself`` two),
    ``overflow="shift"`` (default) inserts the extra tokens and drops as many from the row's end
    (counted in ``dropped``): the text is exact and the row keeps its length. With
    ``overflow="skip"`` the occurrence is left unchanged and counted in ``skipped``.
    ``his`` becomes ``her`` (the determiner; the possessive pronoun cannot be told apart without
    parsing), and in the F→M direction ``her`` becomes ``her_to`` (``"his"`` by default, or ``"him"``).
    """

    def __init__(self, direction: str = "m2f", word_pairs: str | Mapping[str, str] | None = None,
                 her_to: str = "his", overflow: str = "shift"):
        if overflow not in ("shift", "skip"):
            raise ConfigError(f"gender_swap: overflow must be 'shift' or 'skip', got {overflow!r}")
        self.overflow = overflow
        self.dropped = 0
        if direction not in ("m2f", "f2m"):
            raise ConfigError(f"gender_swap: direction must be 'm2f' or 'f2m', got {direction!r}")
        if her_to not in ("his", "him"):
            raise ConfigError(f"gender_swap: her_to must be 'his' or 'him', got {her_to!r}")
        table = dict(PRONOUNS_M2F)
        if word_pairs == "winobias":
            table.update(winobias_pairs())
        elif isinstance(word_pairs, Mapping):
            table.update({str(k).lower(): str(v).lower() for k, v in word_pairs.items()})
        elif word_pairs is not None:
            raise ConfigError(f"gender_swap: word_pairs must be 'winobias' or a mapping, got "
                              f"{word_pairs!r}")
        if direction == "f2m":
            inv: dict[str, str] = {}
            for m, f in table.items():
                inv.setdefault(f, m)
            inv.update(PRONOUNS_F2M)
            inv["her"] = her_to
            table = inv
        self.table = table
        words = sorted(table, key=len, reverse=True)
        self._re = re.compile(r"(?<!\w)(" + "|".join(re.escape(w) for w in words) + r")(?!\w)",
                              re.IGNORECASE)
        self.pieces, self.by_bytes, self.halves = _vocab_tables()
        self._piece_arr, self._piece_len = _piece_arrays()
        self._max_piece = int(self._piece_len.max())
        self.skipped = 0

    @staticmethod
    def _char_offsets(data: bytes, text: str) -> np.ndarray:
        """Byte offset of each character of ``text`` (= ``data`` decoded), and of its end."""
        out = np.empty(len(text) + 1, dtype=np.int64)
        out[-1] = len(data)
        if len(text) == len(data):  # ASCII
            out[:-1] = np.arange(len(data))
            return out
        b = np.frombuffer(data, dtype=np.uint8)
        starts = np.flatnonzero((b & 0xC0) != 0x80)
        if len(starts) == len(text):  # valid UTF-8: a character starts at each non-continuation byte
            out[:-1] = starts
            return out
        out[1:] = np.cumsum([len(c.encode("utf-8", errors="surrogateescape")) for c in text])
        out[0] = 0
        return out

    # -- case
    @staticmethod
    def _recase(src: str, new: str) -> str:
        if src.isupper() and len(src) > 1:
            return new.upper()
        if src[:1].isupper():
            return new[:1].upper() + new[1:]
        return new

    # -- tokenization of exactly k tokens
    def _encode(self, data: bytes) -> list[int]:
        from pythia_jax.data.tokenizer import load_tokenizer
        return load_tokenizer().encode(data.decode("utf-8", errors="strict")).ids

    def _fewest(self, data: bytes) -> list[int] | None:
        n = len(data)
        best: list[tuple[int, int, int] | None] = [None] * (n + 1)  # (count, prev, id)
        best[0] = (0, -1, -1)
        for i in range(n):
            if best[i] is None:
                continue
            for j in range(i + 1, min(n, i + self._max_piece) + 1):
                tid = self.by_bytes.get(data[i:j])
                if tid is not None and (best[j] is None or best[j][0] > best[i][0] + 1):
                    best[j] = (best[i][0] + 1, i, tid)
        if best[n] is None:
            return None
        ids, j = [], n
        while j > 0:
            _, i, tid = best[j]
            ids.append(tid)
            j = i
        return ids[::-1]

    def _split_to(self, ids: list[int], k: int) -> list[int] | None:
        ids = list(ids)
        while len(ids) < k:
            cands = [i for i, t in enumerate(ids) if t in self.halves]
            if not cands:
                return None
            i = max(cands, key=lambda i: len(self.pieces[ids[i]]))
            ids[i:i + 1] = list(self.halves[ids[i]])
        return ids

    def _tokens_of_length(self, data: bytes, k: int) -> list[int] | None:
        try:
            ids = self._encode(data)
        except UnicodeDecodeError:
            ids = self._fewest(data)
            if ids is None:
                return None
        if len(ids) > k:
            ids = self._fewest(data)
            if ids is None or len(ids) > k:
                return None
        return self._split_to(ids, k)

    def __call__(self, row: np.ndarray) -> np.ndarray:
        ids = np.asarray(row, dtype=np.int64)
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= len(self._piece_arr):
            raise TransformError(f"gender_swap: token ids outside the tokenizer's vocabulary "
                                 f"[0, {len(self._piece_arr)})")
        data = b"".join(self._piece_arr[ids])
        text = data.decode("utf-8", errors="surrogateescape")
        if not self._re.search(text):
            return row
        ends = np.cumsum(self._piece_len[ids])
        char_at = self._char_offsets(data, text)
        ids_out = row.tolist()
        nxt = len(row)  # first token of the match handled before (we go right to left)
        for m in reversed(list(self._re.finditer(text))):
            if m.start() == 0:
                continue
            m_start, m_end = int(char_at[m.start()]), int(char_at[m.end()])
            lo = int(np.searchsorted(ends, m_start, side="right"))
            hi = int(np.searchsorted(ends, m_end - 1, side="right"))
            if hi >= nxt:  # two words in one token: the later one's replacement stands
                self.skipped += 1
                continue
            span_start = int(ends[lo - 1]) if lo else 0
            span = data[span_start: int(ends[hi])]
            word = m.group(1)
            new_word = self._recase(word, self.table[word.lower()]).encode()
            a, b = m_start - span_start, m_end - span_start
            new_span = span[:a] + new_word + span[b:]
            k = hi - lo + 1
            ids = self._tokens_of_length(new_span, k)
            if ids is None and self.overflow == "shift":
                ids = self._fewest(new_span)
                if ids is not None:
                    self.dropped += len(ids) - k
            if ids is None:
                self.skipped += 1
                log.debug("gender_swap: %r cannot be replaced in %d token(s); left unchanged",
                          span, k)
                continue
            ids_out[lo:hi + 1] = ids
            nxt = lo
        return np.asarray(ids_out[: len(row)], dtype=row.dtype)


def gender_swap(direction: str = "m2f", word_pairs: str | Mapping[str, str] | None = None,
                her_to: str = "his", overflow: str = "shift") -> RowTransform:
    """The corrected gender swap (:class:`GenderSwap`)."""
    return GenderSwap(direction=direction, word_pairs=word_pairs, her_to=her_to, overflow=overflow)


