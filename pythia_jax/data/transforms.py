"""Named per-row transforms of training rows: the interventions of the Pythia paper, and yours.

A *row transform* maps one training row (integer token ids ``[seq_len + 1]``, the row before the
input/label shift) to a row of the same shape and dtype. It must be deterministic and
order-preserving: the pipeline applies it to the rows of the steps in a window ``[start, stop)``
and leaves every other row byte-identical (``pythia_jax.data.pipeline``).

Built in (``available_transforms()``):

- ``gender_swap`` (corrected): whole words only, every form of he / him / his / himself in any
  case (lower, Title, UPPER), next to punctuation too, never a piece of a longer word; the row
  keeps its length exactly (see :class:`GenderSwap`). ``direction="f2m"`` swaps the other way;
  ``word_pairs="winobias"`` adds WinoBias's gendered word pairs (actor/actress, ...).
- ``gender_swap_tokenmap_2022``: the historical token-id map of the Pythia intervention runs
  (Dec 2022, unmerged GPT-NeoX branch): ten ids replaced, flaws included (`` Him`` and
  `` himself`` are missed; the three ids without a leading space are sub-word pieces, so other
  words containing them change too).
- ``gender_swap_text_2023``: the historical text variant (Jan 2023): decode the row, replace the
  space-delimited words " he ", " him ", " his ", " He ", " Him ", " His " by the feminine ones,
  re-tokenize, then pad with id 1 or truncate to the row length.

User transforms are given by import path, ``"package.module:function"``; the function is called as
``function(row, **params)`` and must return the new row.

Source of the historical variants: Biderman et al. (2023), "Pythia: A Suite for Analyzing Large
Language Models Across Training and Scaling", Section 3.1 (gender-bias intervention), and the
intervention branches of EleutherAI/gpt-neox that trained those models.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pythia_jax.config import ConfigError
from pythia_jax.errors import DataError

log = logging.getLogger(__name__)

RowTransform = Callable[[np.ndarray], np.ndarray]
PAD_ID = 1  # <|padding|> in the GPT-NeoX-20B tokenizer
_INTERVENTIONS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "interventions")


class TransformError(DataError):
    """A row transform that is unknown, misconfigured, or broke the row's shape or dtype."""


# --------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., RowTransform]] = {}


def register_transform(name: str) -> Callable:
    """Decorator: register ``factory(**params) -> RowTransform`` under ``name``."""
    def deco(factory: Callable[..., RowTransform]) -> Callable[..., RowTransform]:
        _REGISTRY[name] = factory
        return factory
    return deco


def available_transforms() -> list[str]:
    """The names of the built-in (and registered) transforms."""
    return sorted(_REGISTRY)


def build_transform(name: str, params: Mapping[str, Any] | None = None) -> RowTransform:
    """The row transform called ``name`` (a registered name or ``"package.module:function"``).

    The result checks every output row: same shape and dtype as the input, else TransformError.
    Raises ConfigError for an unknown name, an import path that does not resolve, or parameters
    the transform does not take.
    """
    params = dict(params or {})
    if name in _REGISTRY:
        try:
            fn = _REGISTRY[name](**params)
        except TypeError as e:
            raise ConfigError(f"transform {name!r}: bad parameters {params}: {e}") from None
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"transform {name!r}: cannot import it ({e}); expected "
                              "'package.module:function'") from None
        fn = functools.partial(target, **params) if params else target
    else:
        raise ConfigError(f"unknown transform {name!r}; available: "
                          f"{', '.join(available_transforms())}, or 'package.module:function'")
    return _Checked(name, fn)


class _Checked:
    """Wraps a transform and refuses outputs of another shape or dtype (one-line TransformError)."""

    def __init__(self, name: str, fn: RowTransform):
        self.name, self.fn = name, fn

    def __call__(self, row: np.ndarray) -> np.ndarray:
        new = self.fn(row.copy())
        if not isinstance(new, np.ndarray):
            raise TransformError(f"transform {self.name!r} returned {type(new).__name__}, "
                                 "expected a numpy array")
        if new.shape != row.shape or new.dtype != row.dtype:
            raise TransformError(f"transform {self.name!r} changed the row from {row.dtype}"
                                 f"{list(row.shape)} to {new.dtype}{list(new.shape)}; a row "
                                 "transform must keep the row's length and dtype")
        return new

    @property
    def skipped(self) -> int:
        return int(getattr(self.fn, "skipped", 0))


@dataclasses.dataclass(frozen=True)
class TransformSpec:
    """A transform by name, its parameters, and the step window ``[start, stop)`` it applies to.

    ``steps=None`` means every step. Recorded in each checkpoint (``to_dict``) so a resume with
    another transform can be refused.
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    steps: tuple[int, int] | None = None

    @classmethod
    def create(cls, name: str, params: Mapping[str, Any] | None = None,
               steps: Sequence[int] | None = None) -> "TransformSpec":
        if steps is not None:
            if len(steps) != 2 or int(steps[0]) < 0 or int(steps[1]) <= int(steps[0]):
                raise ConfigError(f"transform_steps must be (start, stop) with 0 <= start < stop, "
                                  f"got {tuple(steps)}")
            steps = (int(steps[0]), int(steps[1]))
        items = tuple(sorted((str(k), _freeze(v)) for k, v in dict(params or {}).items()))
        return cls(str(name), items, steps)

    def applies_to(self, step: int) -> bool:
        return self.steps is None or self.steps[0] <= step < self.steps[1]

    def build(self) -> RowTransform:
        return build_transform(self.name, dict(self.params))

    def check_within(self, num_steps: int) -> None:
        """ConfigError when the step window lies outside a run of ``num_steps`` steps."""
        if self.steps is not None and self.steps[1] > num_steps:
            raise ConfigError(f"transform_steps {self.steps} reach beyond the run's {num_steps} "
                              f"steps; use a window within [0, {num_steps})")

    def to_dict(self) -> dict:
        return {"name": self.name, "params": {k: v for k, v in self.params},
                "steps": list(self.steps) if self.steps is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "TransformSpec | None":
        if not d:
            return None
        return cls.create(d["name"], d.get("params"), d.get("steps"))


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return v


# ------------------------------------------------------------------------- applying to row blocks
@dataclasses.dataclass
class TransformStats:
    """What a transform changed in a block of rows: rows with any change, token positions changed,
    and occurrences the transform recognised but could not change (``skipped``)."""

    rows_changed: int = 0
    tokens_changed: int = 0
    skipped: int = 0

    def __iadd__(self, other: "TransformStats") -> "TransformStats":
        self.rows_changed += other.rows_changed
        self.tokens_changed += other.tokens_changed
        self.skipped += other.skipped
        return self


def apply_to_rows(rows: np.ndarray, transform: RowTransform) -> tuple[np.ndarray, TransformStats]:
    """Apply ``transform`` to each row of ``rows`` [b, L+1]; return the new rows and the counts."""
    out = np.empty_like(rows)
    before = getattr(transform, "skipped", 0)
    for i, row in enumerate(rows):
        new = np.asarray(transform(row))
        if new.shape != row.shape:
            raise TransformError(f"the row transform changed a row's shape {row.shape} to "
                                 f"{new.shape}; a row transform must keep the row's length")
        out[i] = new
    diff = out != rows
    stats = TransformStats(int(diff.any(axis=1).sum()), int(diff.sum()),
                           int(getattr(transform, "skipped", 0)) - int(before))
    return out, stats


# ------------------------------------------------------------------------ historical: token map
TOKENMAP_2022 = {754: 1500, 3032: 4058, 8389: 10759, 1328: 2993, 521: 617, 344: 703,
                 779: 617, 8701: 379, 13243: 379, 248: 6689}
"""The Dec 2022 intervention's id map (GPT-NeoX-20B tokenizer): ' He'→' She', ' His'→' Her',
'His'→'Her', 'He'→'She', ' his'→' her', ' he'→' she', ' him'→' her', 'his'→'her', 'him'→'her',
'he'→'she'."""


@register_transform("gender_swap_tokenmap_2022")
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


@register_transform("gender_swap_text_2023")
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
        self._max_piece = max(len(p) for p in self.pieces)
        self._piece_arr = np.array(self.pieces, dtype=object)
        self._piece_len = np.array([len(p) for p in self.pieces], dtype=np.int64)
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


@register_transform("gender_swap")
def gender_swap(direction: str = "m2f", word_pairs: str | Mapping[str, str] | None = None,
                her_to: str = "his", overflow: str = "shift") -> RowTransform:
    """The corrected gender swap (:class:`GenderSwap`)."""
    return GenderSwap(direction=direction, word_pairs=word_pairs, her_to=her_to, overflow=overflow)


__all__ = ["RowTransform", "TransformError", "TransformSpec", "TransformStats", "GenderSwap",
           "register_transform", "available_transforms", "build_transform", "apply_to_rows",
           "winobias_pairs", "TOKENMAP_2022", "TEXT_REPLACEMENTS_2023", "PRONOUNS_M2F",
           "PRONOUNS_F2M"]
