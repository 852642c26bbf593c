"""Counting terms over the training rows of steps [A, B), in the exact training order, by step window.

What a model had seen "by step t" is a count over training rows ``[0, B·t)`` of its data order
(B = global batch; step n reads rows ``[B·n, B·n + B)``, ``pythia_jax.data.pipeline``). This module
reads those rows through the same ``Order`` objects the training pipeline and ``pythia-jax
batches`` use (``pythia_jax.data.orders.open_order``) and counts, per step window:

- token n-grams (``NgramCounter``): id sequences matched within each row of ``seq_len + 1`` tokens
  (an n-gram never spans two rows, as the rows were seen in training). Text terms are tokenized
  with the Pythia tokenizer twice, as written (variant ``bare``) and after a leading space
  (variant ``space``: ``" 42"`` is one token, ``"42"`` another); ``--ids`` terms are variant ``ids``.
- a regular expression over each decoded row (``RegexCounter``), per pattern or per matched text;
- the numeral rule of the Pythia paper's term-frequency study (Biderman et al. 2023, §5 / the
  ``EleutherAI/pythia`` ``case-studies`` following Razeghi et al. 2022), ``NumeralCounter``:
  an integer of 1–5 digits counts when another integer is within 1–3 words of it; counted per
  number (variant ``numeral``) and per unordered pair (variant ``numeral_pair``). See
  ``NumeralCounter`` for the exact tokenization of "integer" and "word".

Results form a tidy table, one row per (window, term, variant): ``window_start, window_end, term,
variant, count, cumulative`` where ``count`` is over steps ``[window_start, window_end)`` and
``cumulative`` over ``[first window start, window_end)``. With ``locate`` a second table lists where
terms occur: ``term, variant, step, row_in_step, offset, offset_unit, token_offset`` (``offset``:
the token offset within the row for n-grams, the character offset within the decoded row for
regex/numerals; ``token_offset``: always the token holding the match's first character).

Running (``run_count``): each finished window is written as a part file in ``OUT.parts/`` (with a
``manifest.json`` of what is counted and over which rows), so a rerun with ``resume=True`` skips
finished windows; the table is assembled from the parts and renamed into place at the end. Windows
can be spread over local processes (``workers``) and over hosts (``num_hosts``/``host_index``:
host i takes windows i, i+H, ...; each writes a shard ``OUT.host-0000i-of-0000H.json`` and
``merge_shards`` assembles the same table a single host would write).

The rows come from one ``RunData`` (data prefix, order, seq_len, global batch, seed, train_iters),
so a run's recorded data configuration can fill it directly.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import logging
import os
import re
import shutil
from typing import Any, Iterable, Sequence

import numpy as np

from pythia_jax.data.run_data import RunData  # noqa: F401  (re-exported: the counting API takes one)
from pythia_jax.data.tokenizer import bytes_to_unicode
from pythia_jax.errors import PythiaJaxError
from pythia_jax.io_utils import write_text_atomic

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ("window_start", "window_end", "term", "variant", "count", "cumulative")
LOCATION_COLUMNS = ("term", "variant", "step", "row_in_step", "offset", "offset_unit", "token_offset")
OUTPUT_EXTENSIONS = (".jsonl", ".csv")
MANIFEST_VERSION = 1
# Tokens read per chunk when the caller does not choose (about 8 MB of uint16).
DEFAULT_CHUNK_TOKENS = 4_000_000


class CountError(PythiaJaxError):
    """Bad counting input: terms, patterns, step ranges, windows, outputs, shards."""


# --------------------------------------------------------------------------- the rows


# The rows' settings: ``RunData`` (pythia_jax.data.run_data), from a run's checkpoints or from flags.


def steps_available(order, global_batch: int) -> int:
    """Full steps the order holds: ``len(order) // global_batch``."""
    return len(order) // global_batch


def make_windows(start: int, stop: int, *, window: int | None = None,
                 at_steps: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Step windows ``[a, b)`` covering ``[start, stop)`` in order.

    ``window=W``: ``[start, start+W), [start+W, start+2W), ...`` (the last one may be shorter).
    ``at_steps``: window ends at each given step (e.g. checkpoint steps 1, 2, 4, ..., 143000), plus
    ``stop``; a step equal to ``start`` is dropped (an empty window). Neither: one window.
    Raises ``CountError`` for a window < 1, steps outside ``[start, stop]``, or an empty range.
    """
    if start < 0 or stop <= start:
        raise CountError(f"step range [{start}, {stop}) is empty or negative; expected "
                         "0 <= --start < --stop")
    if window is not None and at_steps is not None:
        raise CountError("give either --window or --at-steps, not both")
    if window is not None:
        if window < 1:
            raise CountError(f"--window {window}: a window must be at least 1 step")
        return [(a, min(a + window, stop)) for a in range(start, stop, window)]
    if at_steps is not None:
        steps = sorted(set(int(s) for s in at_steps))
        if not steps:
            raise CountError("--at-steps is empty; give steps such as 1,2,4,8")
        bad = [s for s in steps if s < start or s > stop]
        if bad:
            raise CountError(f"--at-steps {bad[0]} is outside the counted steps [{start}, {stop}]; "
                             "give steps between --start and --stop")
        ends = [s for s in steps if s > start]
        if not ends or ends[-1] != stop:
            ends.append(stop)
        return list(zip([start] + ends[:-1], ends))
    return [(start, stop)]


# --------------------------------------------------------------------------- what is counted


@dataclasses.dataclass(frozen=True)
class CountSpec:
    """What to count (JSON-able; recorded in the manifest so a resume or merge can check it).

    texts: text terms (each counted as two id sequences: as written, and after a leading space).
    ids: id-sequence terms. regexes: patterns over decoded rows (Python ``re`` syntax).
    per_match: count regex matches per matched text instead of per pattern.
    numerals: the numeral rule (``NumeralCounter``); numeral_max: report only numbers <= this
    (pairs: both numbers), None = all. locate: also record where terms occur, at most
    ``max_locations`` per (term, variant) in training order.
    """

    texts: tuple[str, ...] = ()
    ids: tuple[tuple[int, ...], ...] = ()
    regexes: tuple[str, ...] = ()
    per_match: bool = False
    numerals: bool = False
    numeral_max: int | None = None
    locate: bool = False
    max_locations: int = 1000

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["texts"], d["regexes"] = list(self.texts), list(self.regexes)
        d["ids"] = [list(t) for t in self.ids]
        return d

    def is_empty(self) -> bool:
        return not (self.texts or self.ids or self.regexes or self.numerals)


def parse_ids(spec: str) -> tuple[int, ...]:
    """``"123,456"`` -> (123, 456); raises ``CountError`` for anything else."""
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise CountError(f"--ids {spec!r}: expected comma-separated token ids such as 123,456")
    return tuple(int(p) for p in parts)


Key = tuple[str, str]  # (term, variant)


class NgramCounter:
    """Counts fixed token-id sequences within rows, vectorised with numpy.

    terms: list of (term, variant, ids). Per n-gram length n: positions whose first token is the
    first token of some term are found with a 64K boolean lookup table; the next tokens at those
    positions are packed 16 bits each into a uint64 (exact for up to 4 tokens; longer terms are
    then compared token by token on the candidates) and matched with ``np.searchsorted`` against
    the sorted term keys. Rows: uint16 ``[R, W]``; only positions ``0 <= p <= W - n`` count.
    """

    offset_unit = "token"
    needs_text = False

    def __init__(self, terms: Sequence[tuple[str, str, tuple[int, ...]]]):
        self.terms = [(t, v, tuple(int(i) for i in ids)) for t, v, ids in terms]
        self.keys: list[Key] = [(t, v) for t, v, _ in self.terms]
        self.uniq: list[tuple[int, ...]] = sorted({ids for _, _, ids in self.terms})
        uid = {ids: k for k, ids in enumerate(self.uniq)}
        self.term_uid = np.array([uid[ids] for _, _, ids in self.terms], dtype=np.int64)
        self.groups = []  # per n: (n, bit, uids [u] and their prefix keys [u], sorted by key)
        # One lookup table for all lengths: bit g of lut[t] is set when a term of group g starts
        # with token t (groups beyond 64 share bits; the key comparison sorts them out).
        self.lut = np.zeros(1 << 16, dtype=np.uint64)
        for g, n in enumerate(sorted({len(u) for u in self.uniq})):
            uids = np.array([k for k, u in enumerate(self.uniq) if len(u) == n], dtype=np.int64)
            bit = np.uint64(1 << (g % 64))
            self.lut[[self.uniq[k][0] for k in uids]] |= bit
            pk = np.array([_pack(self.uniq[k][:4]) for k in uids], dtype=np.uint64)
            srt = np.argsort(pk, kind="stable")
            self.groups.append((n, bit, uids[srt], pk[srt]))
        self.lut_dtype = np.uint8 if len(self.groups) <= 8 else np.uint64
        self.lut = self.lut.astype(self.lut_dtype)

    def _matches(self, rows: np.ndarray, positions: bool):
        """Yield (uid, r [m], p [m]) for each distinct id sequence that occurs in ``rows``; without
        ``positions``, single tokens are counted with ``np.bincount`` and yield (uid, count, None)."""
        width = rows.shape[1]
        flat = np.ascontiguousarray(rows).ravel()
        groups = [g for g in self.groups if g[0] <= width]
        if not positions and groups and groups[0][0] == 1:
            _, _, uids, pk = groups.pop(0)
            hits = np.bincount(flat, minlength=1 << 16)[pk.astype(np.int64)]
            for k, h in zip(uids, hits):
                if h:
                    yield int(k), int(h), None
        if not groups:
            return
        flags = self.lut[flat]
        cand = np.flatnonzero(flags)
        fcand, col = flags[cand], cand % width
        for n, bit, uids, pk in groups:
            q = cand[((fcand & bit) != 0) & (col <= width - n)]  # flat positions of candidates
            if not q.size:
                continue
            key = flat[q].astype(np.uint64)
            for j in range(1, min(n, 4)):
                key = (key << np.uint64(16)) | flat[q + j]
            lo = np.searchsorted(pk, key, side="left")
            hi = np.searchsorted(pk, key, side="right")
            hit = hi > lo
            if not hit.any():
                continue
            q, lo, hi = q[hit], lo[hit], hi[hit]
            if n <= 4:  # the key is the whole sequence: one uid per key
                order = np.argsort(lo, kind="stable")
                q, lo = q[order], lo[order]
                bounds = np.flatnonzero(np.diff(lo)) + 1
                for seg_q, seg_lo in zip(np.split(q, bounds), np.split(lo, bounds)):
                    yield int(uids[seg_lo[0]]), seg_q // width, seg_q % width
                continue
            for j in range(len(uids)):  # longer than 4 tokens: compare the rest on the candidates
                ids = self.uniq[int(uids[j])]
                qq = q[(lo <= j) & (j < hi)]
                if not qq.size:
                    continue
                tail = flat[qq[:, None] + np.arange(4, n)]
                qq = qq[np.all(tail == np.asarray(ids[4:], dtype=flat.dtype), axis=1)]
                if qq.size:
                    yield int(uids[j]), qq // width, qq % width

    def count(self, rows: np.ndarray, texts=None) -> dict[Key, int]:
        per_uid = np.zeros(len(self.uniq), dtype=np.int64)
        for uid, r, _ in self._matches(rows, positions=False):
            per_uid[uid] += r if isinstance(r, int) else r.size
        counts = per_uid[self.term_uid]
        return {key: int(c) for key, c in zip(self.keys, counts) if c}

    def locate(self, rows: np.ndarray, texts, limit: int) -> list[tuple[str, str, int, int]]:
        """(term, variant, row index in ``rows``, token offset), in row-major order, <= limit each."""
        found = {uid: (r, p) for uid, r, p in self._matches(rows, positions=True)}
        out = []
        for (t, v), uid in zip(self.keys, self.term_uid):
            if int(uid) not in found:
                continue
            r, p = found[int(uid)]
            o = np.lexsort((p, r))[:limit]
            out.extend((t, v, int(a), int(b)) for a, b in zip(r[o], p[o]))
        return out


def _pack(ids: Sequence[int]) -> int:
    key = 0
    for i in ids:
        key = (key << 16) | int(i)
    return key


class RegexCounter:
    """Matches of regular expressions in each decoded row (``re.finditer``, non-overlapping).

    Per pattern (term = the pattern, variant ``regex``) or, with ``per_match``, per matched text
    (term = the match, variant = ``regex:<pattern>``). Offsets are characters in the decoded row.
    """

    offset_unit = "char"
    needs_text = True

    def __init__(self, patterns: Sequence[str], per_match: bool = False):
        self.patterns = list(patterns)
        self.compiled = [compile_regex(p) for p in self.patterns]
        self.per_match = per_match
        self.keys: list[Key] = [] if per_match else [(p, "regex") for p in self.patterns]

    def _iter(self, texts: Sequence[str]):
        for pat, rx in zip(self.patterns, self.compiled):
            for i, text in enumerate(texts):
                for m in rx.finditer(text):
                    key = (m.group(0), f"regex:{pat}") if self.per_match else (pat, "regex")
                    yield key, i, m.start()

    def count(self, rows, texts: Sequence[str]) -> dict[Key, int]:
        if not self.per_match:
            return {(p, "regex"): n for p, rx in zip(self.patterns, self.compiled)
                    if (n := sum(sum(1 for _ in rx.finditer(t)) for t in texts))}
        return dict(collections.Counter(key for key, _, _ in self._iter(texts)))

    def locate(self, rows, texts: Sequence[str], limit: int):
        seen: collections.Counter = collections.Counter()
        out = []
        for key, i, off in self._iter(texts):
            if seen[key] < limit:
                seen[key] += 1
                out.append((key[0], key[1], i, off))
        return out


def compile_regex(pattern: str) -> re.Pattern:
    """``re.compile(pattern)``; a ``CountError`` naming the problem if it does not compile."""
    if not pattern:
        raise CountError("--regex '': an empty pattern matches everywhere; give a pattern")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise CountError(f"--regex {pattern!r} does not compile: {e}; fix the pattern "
                         "(Python re syntax)") from None


# An integer: 1-5 digits, not part of a longer number, a word ("5th"), a decimal ("3.14") or a
# digit group ("1,000").
INTEGER_RE = re.compile(r"(?<![\w.,])\d{1,5}(?!\w|[.,]\d)")
WORD_START_RE = re.compile(r"(?<=\s)\S")  # where a word (a run of \S) begins


class NumeralCounter:
    """The term-frequency study's numeral rule over decoded rows.

    Definitions (the Pythia paper's case study, following Razeghi et al. 2022, "Impact of
    Pretraining Term Frequencies on Few-Shot Reasoning"): an *integer* is a run of 1-5 digits
    that is not part of a longer digit run, a word, a decimal or a digit group
    (``INTEGER_RE``: ``(?<![\\w.,])\\d{1,5}(?!\\w|[.,]\\d)``); *words* are maximal runs of
    non-whitespace (``\\S+``) and an integer's word index is that of the word containing it. An
    integer occurrence counts (variant ``numeral``, term = its value, e.g. ``"7"`` for ``"07"``)
    when another integer occurrence is ``min_gap``..``max_gap`` (default 1..3) words away; each
    unordered pair of integer occurrences that far apart counts once for the pair (variant
    ``numeral_pair``, term ``"a b"`` with a <= b). ``numeral_max`` limits which values are
    reported (pairs: both values); neighbours are any integers.
    """

    offset_unit = "char"
    needs_text = True

    def __init__(self, numeral_max: int | None = None, min_gap: int = 1, max_gap: int = 3):
        self.numeral_max = numeral_max
        self.min_gap, self.max_gap = min_gap, max_gap
        self.keys: list[Key] = []

    def _occurrences(self, text: str):
        """(value [k], char offset [k], word index [k] relative to the first) of the integers in
        ``text``; None when fewer than two (no integer can have a neighbour)."""
        found = list(INTEGER_RE.finditer(text))
        if len(found) < 2:
            return None
        off = [m.start() for m in found]
        # Words between consecutive integers: word starts (non-space after space) in (s_i, s_i+1].
        gaps = [len(WORD_START_RE.findall(text, a + 1, b + 1)) for a, b in zip(off, off[1:])]
        word = np.concatenate([[0], np.cumsum(gaps, dtype=np.int64)])
        val = np.array([int(m.group(0)) for m in found], dtype=np.int64)
        return val, np.array(off, dtype=np.int64), word

    def _row(self, text: str):
        """(qualifying occurrences: values, offsets), (pairs: a [q], b [q])."""
        occ = self._occurrences(text)
        if occ is None:
            return None
        val, off, word = occ
        k = val.size
        qual = np.zeros(k, dtype=bool)
        pa, pb = [], []
        # Word indices are non-decreasing, so partners are the next few occurrences; shift by d.
        for d in range(1, k):
            gap = word[d:] - word[:-d]
            if gap.min() > self.max_gap:
                break
            ok = (gap >= self.min_gap) & (gap <= self.max_gap)
            if ok.any():
                qual[d:] |= ok
                qual[:-d] |= ok
                pa.append(val[:-d][ok])
                pb.append(val[d:][ok])
        a = np.concatenate(pa) if pa else np.zeros(0, np.int64)
        b = np.concatenate(pb) if pb else np.zeros(0, np.int64)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        if self.numeral_max is not None:
            keep_pair = hi <= self.numeral_max
            lo, hi = lo[keep_pair], hi[keep_pair]
            qual &= val <= self.numeral_max
        return (val[qual], off[qual]), (lo, hi)

    def count(self, rows, texts: Sequence[str]) -> dict[Key, int]:
        vals, los, his = [], [], []
        for text in texts:
            got = self._row(text)
            if got is None:
                continue
            (v, _), (lo, hi) = got
            vals.append(v)
            los.append(lo)
            his.append(hi)
        out: dict[Key, int] = {}
        if vals:
            u, c = np.unique(np.concatenate(vals), return_counts=True)
            out.update({(str(a), "numeral"): int(n) for a, n in zip(u, c)})
            lo, hi = np.concatenate(los), np.concatenate(his)
            if lo.size:
                pairs, c = np.unique(np.stack([lo, hi], axis=1), axis=0, return_counts=True)
                out.update({(f"{a} {b}", "numeral_pair"): int(n) for (a, b), n in zip(pairs, c)})
        return out

    def locate(self, rows, texts: Sequence[str], limit: int):
        seen: collections.Counter = collections.Counter()
        out = []
        for i, text in enumerate(texts):
            got = self._row(text)
            if got is None:
                continue
            for v, o in zip(*got[0]):
                key = (str(int(v)), "numeral")
                if seen[key] < limit:
                    seen[key] += 1
                    out.append((key[0], key[1], i, int(o)))
        return out


def build_counters(spec: CountSpec) -> list:
    """The counters for ``spec``; raises ``CountError`` for an empty term list or a bad term."""
    if spec.is_empty():
        raise CountError("nothing to count: give --text, --ids, --terms-file, --regex or "
                         "--preset numerals")
    if spec.max_locations < 1:
        raise CountError(f"--max-locations {spec.max_locations}: expected >= 1")
    counters: list = []
    ngrams: list[tuple[str, str, tuple[int, ...]]] = []
    if spec.texts:
        from pythia_jax.data.tokenizer import encode

        for text in spec.texts:
            if not text or not text.strip():
                raise CountError(f"text term {text!r} is empty or blank; give a word or phrase")
            ngrams.append((text, "bare", tuple(encode(text))))
            ngrams.append((text, "space", tuple(encode(" " + text))))
    for ids in spec.ids:
        if not ids:
            raise CountError("an --ids term is empty; expected ids such as 123,456")
        bad = [i for i in ids if not 0 <= i < (1 << 16)]
        if bad:
            raise CountError(f"--ids {','.join(map(str, ids))}: id {bad[0]} is outside the uint16 "
                             "token range [0, 65535] of Pythia data")
        ngrams.append((",".join(map(str, ids)), "ids", tuple(ids)))
    if ngrams:
        counters.append(NgramCounter(ngrams))
    if spec.regexes:
        counters.append(RegexCounter(spec.regexes, spec.per_match))
    if spec.numerals:
        if spec.numeral_max is not None and spec.numeral_max < 0:
            raise CountError(f"--numeral-max {spec.numeral_max}: expected >= 0")
        counters.append(NumeralCounter(spec.numeral_max))
    return counters


def fixed_keys(counters) -> list[Key]:
    """Keys reported in every window (zeros included): n-gram terms and per-pattern regexes."""
    keys: list[Key] = []
    for c in counters:
        keys.extend(k for k in c.keys if k not in keys)
    return keys


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


# --------------------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(run: RunData, spec: CountSpec) -> None:
    _WORKER["order"] = run.open()
    _WORKER["counters"] = build_counters(spec)
    _WORKER["run"], _WORKER["spec"] = run, spec


def _count_chunk(task: tuple[int, int, int, int]):
    """Count steps [a, b) of window ``w`` (chunk ``c``): (w, c, counts, locations, tokens)."""
    w, c, a, b = task
    run, spec = _WORKER["run"], _WORKER["spec"]
    B = run.global_batch
    rows = run.read_range(_WORKER["order"], a * B, b * B)  # the run's transform applied
    counts, locs = count_rows(_WORKER["counters"], rows, locate=spec.locate,
                              max_locations=spec.max_locations)
    locs = [(t, v, a + i // B, i % B, off, unit, tok) for t, v, i, off, unit, tok in locs]
    return w, c, counts, locs, int(rows.size)


# --------------------------------------------------------------------------- files


def output_format(path: str) -> str:
    for ext in OUTPUT_EXTENSIONS:
        if path.endswith(ext):
            return ext[1:]
    raise CountError(f"--out {path}: expected a .jsonl or .csv file name")


def locations_path(out: str) -> str:
    """``counts.jsonl`` -> ``counts.locations.jsonl`` (same format)."""
    ext = "." + output_format(out)
    return out[: -len(ext)] + ".locations" + ext


def work_dir(out: str) -> str:
    return out + ".parts"


def shard_path(out: str, num_hosts: int, host_index: int) -> str:
    return f"{out}.host-{host_index:05d}-of-{num_hosts:05d}.json"


def _part_name(window: tuple[int, int]) -> str:
    return f"window-{window[0]:09d}-{window[1]:09d}.json"


def make_manifest(run: RunData, spec: CountSpec, windows: Sequence[tuple[int, int]],
                  counters) -> dict:
    """What a count is: the rows, the terms (with their token ids), the windows."""
    terms = [[t, v, list(ids)] for c in counters if isinstance(c, NgramCounter)
             for t, v, ids in c.terms]
    return {"version": MANIFEST_VERSION, "run": run.fingerprint(), "count": spec.to_json(),
            "ngram_ids": terms, "fixed_keys": [list(k) for k in fixed_keys(counters)],
            "windows": [list(w) for w in windows]}


def _manifest_difference(a: dict, b: dict) -> str | None:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key
    return None


def _table_rows(manifest: dict, results: dict[tuple[int, int], dict]) -> Iterable[tuple]:
    """Tidy rows from per-window results ({window: {"counts": [[t, v, n]...]}}), in window order."""
    fixed = [tuple(k) for k in manifest["fixed_keys"]]
    fixed_set = set(fixed)
    cumulative: collections.Counter = collections.Counter()
    dynamic: set = set()
    for a, b in (tuple(w) for w in manifest["windows"]):
        counts = {(t, v): n for t, v, n in results[(a, b)]["counts"]}
        cumulative.update(counts)
        dynamic.update(k for k in counts if k not in fixed_set)
        for key in fixed + sorted(dynamic, key=_natural_key):
            yield (a, b, key[0], key[1], counts.get(key, 0), cumulative[key])


def _natural_key(key: Key):
    term, variant = key
    nums = term.split(" ")
    if all(n.isdigit() for n in nums):
        return (variant, 0, tuple(int(n) for n in nums), term)
    return (variant, 1, (), term)


def _location_rows(manifest: dict, results) -> list[tuple]:
    limit = manifest["count"]["max_locations"]
    seen: collections.Counter = collections.Counter()
    out = []
    for w in manifest["windows"]:
        for loc in results[tuple(w)]["locations"]:
            t, v = loc[0], loc[1]
            if seen[(t, v)] < limit:
                seen[(t, v)] += 1
                out.append(tuple(loc))
    return out


def _render(rows: Iterable[tuple], columns: Sequence[str], fmt: str) -> str:
    buf = io.StringIO()
    if fmt == "csv":
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)
    else:
        for row in rows:
            buf.write(json.dumps(dict(zip(columns, row)), ensure_ascii=False) + "\n")
    return buf.getvalue()


def assemble(manifest: dict, results: dict, out: str) -> dict[str, str]:
    """Write the table (and the locations table when locating) atomically; return their paths."""
    fmt = output_format(out)
    written = {"table": out}
    if manifest["count"]["locate"]:
        loc = locations_path(out)
        write_text_atomic(loc, _render(_location_rows(manifest, results), LOCATION_COLUMNS, fmt))
        written["locations"] = loc
    write_text_atomic(out, _render(_table_rows(manifest, results), TABLE_COLUMNS, fmt))
    return written


def read_table(path: str) -> list[dict]:
    """The rows of a count table (JSONL or CSV) as dicts with ints where the columns are ints."""
    fmt = output_format(path)
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            return [json.loads(line) for line in f if line.strip()]
        rows = list(csv.DictReader(f))
    ints = {"window_start", "window_end", "count", "cumulative", "step", "row_in_step", "offset"}
    return [{k: int(v) if k in ints else v for k, v in r.items()} for r in rows]


# --------------------------------------------------------------------------- running


def chunk_tasks(windows: Sequence[tuple[int, int]], pending: Sequence[int],
                chunk_steps: int) -> list[tuple[int, int, int, int]]:
    """(window index, chunk index, step a, step b) for each chunk of the pending windows."""
    tasks = []
    for w in pending:
        a0, b0 = windows[w]
        for c, a in enumerate(range(a0, b0, chunk_steps)):
            tasks.append((w, c, a, min(a + chunk_steps, b0)))
    return tasks


def _merge_chunks(chunks: list, max_locations: int) -> dict:
    """Combine a window's chunk results (in chunk order) into one window result."""
    counts: collections.Counter = collections.Counter()
    locs, seen, tokens = [], collections.Counter(), 0
    for c_counts, c_locs, c_tokens in chunks:
        counts.update(c_counts)
        tokens += c_tokens
        for loc in c_locs:
            if seen[loc[:2]] < max_locations:
                seen[loc[:2]] += 1
                locs.append(list(loc))
    return {"counts": [[t, v, n] for (t, v), n in counts.items()], "locations": locs,
            "tokens": tokens}


def run_count(run: RunData, spec: CountSpec, out: str, *, start: int = 0, stop: int | None = None,
              window: int | None = None, at_steps: Sequence[int] | None = None,
              resume: bool = False, workers: int = 1, num_hosts: int = 1, host_index: int = 0,
              chunk_steps: int | None = None, progress: bool = True) -> dict[str, str]:
    """Count ``spec`` over the training rows of steps [start, stop) of ``run``, by window.

    stop: None = every full step the order has for training (``min(train_iters, rows // B)`` for
    ``neox``; ``rows // B`` for ``preshuffled``). Writes the table to ``out`` (``.jsonl``/``.csv``)
    with one host, or this host's shard (``shard_path``) with ``num_hosts > 1``; returns the
    paths written. All input is checked before anything is written; ``CountError`` (or
    ``DataError`` from the data) otherwise. Finished windows are kept in ``work_dir(out)`` until
    the end, so an interrupted run continues with ``resume=True``.
    """
    output_format(out)
    if num_hosts < 1 or not 0 <= host_index < num_hosts:
        raise CountError(f"--host-index {host_index} is not in [0, --num-hosts {num_hosts})")
    if workers < 1:
        raise CountError(f"--workers {workers}: expected >= 1")
    final = out if num_hosts == 1 else shard_path(out, num_hosts, host_index)
    if os.path.exists(final) and not resume:
        raise CountError(f"output {final} already exists; pass --resume to finish or redo it, or "
                         "choose another --out")
    counters = build_counters(spec)
    order = run.open()
    have = steps_available(order, run.global_batch)
    if stop is None:
        stop = max(at_steps) if at_steps else (
            min(run.train_iters, have) if run.order == "neox" else have)
    if stop > have:
        raise CountError(f"{order.name}: steps [{start}, {stop}) need rows up to "
                         f"{stop * run.global_batch:,}, the {run.order} order has {len(order):,} "
                         f"rows = {have:,} full steps of {run.global_batch}; lower --stop")
    windows = make_windows(start, stop, window=window, at_steps=at_steps)
    manifest = make_manifest(run, spec, windows, counters)

    wdir = work_dir(out)
    mine = list(range(host_index, len(windows), num_hosts))
    done = _load_parts(wdir, manifest, windows, mine, resume)
    pending = [w for w in mine if windows[w] not in done]
    if not os.path.isdir(wdir):
        os.makedirs(wdir)
    write_text_atomic(os.path.join(wdir, "manifest.json"), json.dumps(manifest, indent=1))

    tokens_per_step = run.global_batch * (run.seq_len + 1)
    if chunk_steps is None:
        chunk_steps = max(1, DEFAULT_CHUNK_TOKENS // tokens_per_step)
    tasks = chunk_tasks(windows, pending, chunk_steps)
    n_chunks = collections.Counter(w for w, *_ in tasks)
    got: dict[int, dict[int, tuple]] = collections.defaultdict(dict)
    total = sum((b - a) for _, _, a, b in tasks) * tokens_per_step
    logger.info("counting %d of %d windows (%d already done) over %s tokens", len(pending),
                len(mine), len(mine) - len(pending), f"{total:,}")

    bar = _progress_bar(total, progress)
    try:
        for w, c, counts, locs, ntok in _run_tasks(run, spec, tasks, workers, order, counters):
            got[w][c] = (counts, locs, ntok)
            bar.update(ntok)
            if len(got[w]) == n_chunks[w]:
                result = _merge_chunks([got[w][k] for k in range(n_chunks[w])], spec.max_locations)
                result["window"] = list(windows[w])
                write_text_atomic(os.path.join(wdir, _part_name(windows[w])), json.dumps(result))
                done[windows[w]] = result
                del got[w]
    finally:
        bar.close()

    if num_hosts == 1:
        written = assemble(manifest, done, out)
    else:
        shard = {"manifest": manifest, "num_hosts": num_hosts, "host_index": host_index,
                 "results": [done[windows[w]] | {"window": list(windows[w])} for w in mine]}
        write_text_atomic(final, json.dumps(shard))
        written = {"shard": final}
    shutil.rmtree(wdir, ignore_errors=True)
    return written


def _load_parts(wdir: str, manifest: dict, windows, mine: Sequence[int], resume: bool) -> dict:
    """Finished windows in ``wdir`` (checked against ``manifest``); {} when starting afresh."""
    if not os.path.isdir(wdir):
        return {}
    names = [n for n in os.listdir(wdir) if n.startswith("window-") and n.endswith(".json")]
    if not resume:
        raise CountError(f"{wdir} holds {len(names)} finished windows of an earlier count; pass "
                         "--resume to continue it, or remove the directory")
    mpath = os.path.join(wdir, "manifest.json")
    if os.path.exists(mpath):
        with open(mpath, encoding="utf-8") as f:
            old = json.load(f)
        diff = _manifest_difference(old, manifest)
        if diff:
            raise CountError(f"{wdir} holds an earlier count with a different {diff!r} (data, "
                             "terms or windows changed); remove the directory or use another --out")
    done = {}
    wanted = {windows[w] for w in mine}
    for name in names:
        with open(os.path.join(wdir, name), encoding="utf-8") as f:
            part = json.load(f)
        w = tuple(part["window"])
        if w in wanted:
            done[w] = part
    logger.info("resuming: %d finished windows in %s", len(done), wdir)
    return done


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="count", disable=not enabled,
                smoothing=0.1)


def _run_tasks(run: RunData, spec: CountSpec, tasks, workers: int, order, counters):
    """Results of ``_count_chunk`` for each task, in this process or in ``workers`` processes."""
    if not tasks:
        return
    if workers == 1 or len(tasks) == 1:
        _WORKER.update(order=order, counters=counters, run=run, spec=spec)
        try:
            for task in tasks:
                yield _count_chunk(task)
        finally:
            _WORKER.clear()
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork after the tokenizer's threads started
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(run, spec)) as pool:
        yield from pool.imap_unordered(_count_chunk, tasks)


# --------------------------------------------------------------------------- merging hosts


def merge_shards(paths: Sequence[str], out: str, *, overwrite: bool = False) -> dict[str, str]:
    """Assemble host shards (``run_count`` with ``num_hosts > 1``) into the single-host table.

    Raises ``CountError`` when the shards describe different counts, a window is missing (naming
    the host that should have it) or present twice, or ``out`` exists (unless ``overwrite``).
    """
    output_format(out)
    if not paths:
        raise CountError("no shard files given; expected the OUT.host-*-of-*.json files of every host")
    if os.path.exists(out) and not overwrite:
        raise CountError(f"output {out} already exists; pass --overwrite or choose another --out")
    manifest, results, hosts = None, {}, {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                shard = json.load(f)
            m = shard["manifest"]
        except FileNotFoundError:
            raise CountError(f"{path}: shard file not found") from None
        except (ValueError, KeyError, TypeError) as e:
            raise CountError(f"{path}: not a count shard ({e.__class__.__name__}: {e})") from None
        if manifest is None:
            manifest = m
        elif (diff := _manifest_difference(manifest, m)):
            raise CountError(f"{path}: a different count than {paths[0]} ({diff!r} differs); merge "
                             "shards of one count only")
        hosts[shard["host_index"]] = shard["num_hosts"]
        for r in shard["results"]:
            w = tuple(r["window"])
            if w in results:
                raise CountError(f"{path}: window [{w[0]}, {w[1]}) is also in another shard; give "
                                 "each host's shard once")
            results[w] = r
    windows = [tuple(w) for w in manifest["windows"]]
    missing = [k for k, w in enumerate(windows) if w not in results]
    if missing:
        n = next(iter(hosts.values()))
        w = windows[missing[0]]
        raise CountError(f"{len(missing)} of {len(windows)} windows are missing, first [{w[0]}, "
                         f"{w[1]}) (host {missing[0] % n} of {n}); add that host's shard")
    return assemble(manifest, results, out)
