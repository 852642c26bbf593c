"""Running a count: ``run_count`` over windows and chunks, resumable from part files, in this
process or in worker processes (``_count_chunk``), one host's share of the windows at a time.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
from typing import Any, Sequence

from pythia_jax.data.count.counters import build_counters
from pythia_jax.data.count.decoder import count_rows
from pythia_jax.data.count.files import (
    _manifest_difference,
    _part_name,
    assemble,
    check_count_outputs,
    make_manifest,
    output_format,
    read_table,
    shard_path,
    work_dir,
)
from pythia_jax.data.count.spec import DEFAULT_CHUNK_TOKENS, CountError, CountSpec, make_windows, steps_available
from pythia_jax.data.run_data import RunData
from pythia_jax.io_utils import write_text_atomic

logger = logging.getLogger(__name__)

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
    ``neox`` and for a run's recorded settings; ``rows // B`` for ``preshuffled`` from flags).
    Steps beyond a recorded run's ``train_iters`` are refused (``RunData.check_steps``).
    Writes the table to ``out`` (``.jsonl``/``.csv``)
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
    check_count_outputs(final, locate=spec.locate and num_hosts == 1, resume=resume, wdir=work_dir(out))
    counters = build_counters(spec)
    if stop is not None or at_steps:  # a recorded run: no steps beyond the ones it trained
        asked = stop if stop is not None else max(at_steps)
        run.check_steps(start, asked, f"steps [{start}, {asked})")
    order = run.open()
    have = steps_available(order, run.global_batch)
    if stop is None:
        trained = run.train_iters is not None and (run.order == "neox" or run.recorded)
        stop = max(at_steps) if at_steps else min(run.train_iters, have) if trained else have
    if stop > have:
        raise CountError(f"{order.name}: steps [{start}, {stop}) need rows up to "
                         f"{stop * run.global_batch:,}, the {run.order} order has {len(order):,} "
                         f"rows = {have:,} full steps of {run.global_batch}; lower --stop")
    windows = make_windows(start, stop, window=window, at_steps=at_steps)
    manifest = make_manifest(run, spec, windows, counters)

    wdir = work_dir(out)
    if num_hosts == 1 and os.path.exists(final) and not os.path.isdir(wdir):
        _check_redo(final, manifest, spec)  # --resume of a finished table: the same count only
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


def _check_redo(out: str, manifest: dict, spec) -> None:
    """``resume`` on a finished table redoes it; refuse (``CountError``) when the table holds
    terms this count would not list, or lacks ones it always lists: it is another count."""
    fixed = {tuple(k) for k in manifest["fixed_keys"]}
    regexes = {f"regex:{r}" for r in spec.regexes} if spec.per_match else set()

    def ours(key: tuple[str, str]) -> bool:
        return key in fixed or (spec.numerals and key[1] in ("numeral", "numeral_pair")) or key[1] in regexes

    have = {(str(r["term"]), str(r["variant"])) for r in read_table(out)}
    other = sorted(k for k in have if not ours(k))
    missing = sorted(fixed - have)
    if other or missing:
        example = other[0] if other else missing[0]
        raise CountError(f"{out} is a finished count of other terms ({example[0]!r} {example[1]} "
                         f"{'is in it, not in this count' if other else 'is missing'}); --resume "
                         "redoes only the same count: choose another --out or remove it")


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
