"""The counters: token n-grams (``NgramCounter``), regular expressions over decoded rows
(``RegexCounter``) and the Pythia paper's numeral rule (``NumeralCounter``); ``build_counters``.
"""

from __future__ import annotations

import collections
import logging
import re
from typing import Sequence

import numpy as np

from pythia_jax.data.count.spec import CountError, CountSpec

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
        compiled = re.compile(pattern)
    except re.error as e:
        raise CountError(f"--regex {pattern!r} does not compile: {e}; fix the pattern "
                         "(Python re syntax)") from None
    # 'x*', '\\b\\d*', '^': empty matches are counted like any other (meant for '^', rarely for 'x*')
    if any(m.end() == m.start() for m in compiled.finditer("ab a1 b\n12 x\n\n")):
        logging.getLogger(__name__).warning(
            "--regex %r can match the empty string: its empty matches are counted too ('x*' matches between "
            "every two characters; 'x+' does not)", pattern)
    return compiled


# An integer: 1-5 digits, not part of a longer number, a word ("5th"), a decimal ("3.14") or a
# digit group ("1,000").
INTEGER_RE = re.compile(r"(?<![\w.,])\d{1,5}(?!\w|[.,]\d)")
MAX_NUMERAL = 99_999  # the largest integer INTEGER_RE matches
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
    reported (pairs: both values); neighbours are any integers. With ``numeral_max`` every
    number 0..numeral_max is listed in every window, zeros included (``keys``), so a table says
    which numbers were counted (``pythia_jax.analysis.term_frequency`` refuses unlisted ones).
    """

    offset_unit = "char"
    needs_text = True

    def __init__(self, numeral_max: int | None = None, min_gap: int = 1, max_gap: int = 3):
        self.numeral_max = numeral_max
        self.min_gap, self.max_gap = min_gap, max_gap
        top = None if numeral_max is None else min(numeral_max, MAX_NUMERAL)
        self.keys: list[Key] = [] if top is None else [(str(v), "numeral") for v in range(top + 1)]

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
