"""The files of a count: output formats, the ``OUT.parts/`` manifest and part names, assembling
the tables, reading a table back, and merging host shards (``merge_shards``).
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
from typing import Iterable, Sequence

from pythia_jax.data.count.counters import Key, NgramCounter, fixed_keys
from pythia_jax.data.count.spec import (
    LOCATION_COLUMNS,
    MANIFEST_VERSION,
    OUTPUT_EXTENSIONS,
    TABLE_COLUMNS,
    CountError,
    CountSpec,
)
from pythia_jax.data.run_data import RunData
from pythia_jax.io_utils import atomic_files

# --------------------------------------------------------------------------- files


def output_format(path: str) -> str:
    for ext in OUTPUT_EXTENSIONS:
        if path.endswith(ext):
            return ext[1:]
    raise CountError(f"--out {path}: expected a .jsonl or .csv file name")


def check_count_outputs(out: str, *, locate: bool, resume: bool, wdir: str | None = None,
                        inputs=()) -> None:
    """Before any counting: ``out`` (and ``locations_path(out)`` when ``locate``) may be written.

    An existing ``out`` needs ``resume`` (then it is redone); an existing output that is not a
    count table (a folder, any other file) is refused, and so is a ``wdir`` (default
    ``work_dir(out)``, where finished windows are kept) that is not a folder. ``CountError`` /
    ``PythiaJaxError``, one line naming the path."""
    from pythia_jax.io_utils import check_output_file, describe_path

    check_output_file(out, "count", inputs=inputs)  # first: --resume cannot make another file a count
    if os.path.exists(out) and not resume:
        raise CountError(f"output {out} already exists; pass --resume to finish or redo it, or "
                         "choose another --out")
    if locate:
        check_output_file(locations_path(out), "count", inputs=inputs)
    wdir = work_dir(out) if wdir is None else wdir
    if os.path.lexists(wdir) and not os.path.isdir(wdir):
        raise CountError(f"{wdir} (where a count keeps its finished windows) is {describe_path(wdir)}, "
                         "not a folder; remove it or choose another --out")


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
    """Write the table (and the locations table when locating) and publish them together
    (``io_utils.atomic_files``: both or, on any failure or interruption, neither); return their
    paths."""
    fmt = output_format(out)
    written = {"table": out}
    texts = [_render(_table_rows(manifest, results), TABLE_COLUMNS, fmt)]
    if manifest["count"]["locate"]:
        written["locations"] = locations_path(out)
        texts.append(_render(_location_rows(manifest, results), LOCATION_COLUMNS, fmt))
    with atomic_files(*written.values()) as temps:
        for tmp, text in zip(temps, texts):
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)
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



# --------------------------------------------------------------------------- merging hosts


def merge_shards(paths: Sequence[str], out: str, *, overwrite: bool = False) -> dict[str, str]:
    """Assemble host shards (``run_count`` with ``num_hosts > 1``) into the single-host table.

    Raises ``CountError`` when the shards describe different counts, a window is missing (naming
    the host that should have it) or present twice, or ``out`` exists (unless ``overwrite``).
    """
    from pythia_jax.io_utils import check_output_file

    output_format(out)
    if not paths:
        raise CountError("no shard files given; expected the OUT.host-*-of-*.json files of every host")
    if os.path.exists(out) and not overwrite:
        raise CountError(f"output {out} already exists; pass --overwrite or choose another --out")
    check_output_file(out, "count", inputs=paths)
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
    if manifest["count"]["locate"]:
        check_output_file(locations_path(out), "count", inputs=paths)
    windows = [tuple(w) for w in manifest["windows"]]
    missing = [k for k, w in enumerate(windows) if w not in results]
    if missing:
        n = next(iter(hosts.values()))
        w = windows[missing[0]]
        raise CountError(f"{len(missing)} of {len(windows)} windows are missing, first [{w[0]}, "
                         f"{w[1]}) (host {missing[0] % n} of {n}); add that host's shard")
    return assemble(manifest, results, out)
