"""What is counted and over which steps: the table columns, ``CountError``, ``CountSpec`` and the
step windows (``make_windows``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from pythia_jax.data.run_data import RunData  # noqa: F401  (re-exported: the counting API takes one)
from pythia_jax.errors import PythiaJaxError

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
