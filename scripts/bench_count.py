#!/usr/bin/env python3
"""Throughput of ``pythia-jax count`` against its limits, in one run on the same rows.

- n-gram mode (``run_count`` with text terms, end to end: read rows, count, write the table)
  against a plain ``numpy.memmap`` read of the same rows (the limit: counting cannot be faster
  than reading);
- regex mode and the numerals preset against a plain decode of the same rows (the tokenizer's
  ``decode_batch``); count decodes with its own byte table (``ByteDecoder``, the same text),
  also timed alone.

The rows: the bundled demo data's GPT-NeoX order at ``--seq-len`` (default 2048, Pythia's),
written once as a pre-shuffled dataset in a temporary directory (the Pythia release's layout:
row j = bytes [j·W·2, (j+1)·W·2) of the .bin), so the memmap baseline reads exactly the rows the
count reads. Each measurement is the best of ``--repeats`` runs with the page cache warm.

Extrapolation: the Pythia training data is 143,000 steps × 1,024 rows × 2,049 tokens ≈ 3.0e11
tokens. One process's rate × ``--procs-per-host`` processes (linear scaling assumed: each
process counts its own windows; disk bandwidth may cap it), and × ``--hosts`` for a pod. Default
pod: a v4-64 = 64 TensorCores = 32 chips at 4 chips per TPU VM host = 8 hosts (240 vCPUs each,
machine type ct4p-hightpu-4t), all counting from local copies of the data.

    python scripts/bench_count.py                  # ~1 min on a laptop core
    python scripts/bench_count.py --rows 8192 --procs-per-host 200
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PILE_TOKENS = 143000 * 1024 * 2049


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096, help="rows counted (of seq-len+1 tokens)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64, help="rows per step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--procs-per-host", type=int, default=64)
    p.add_argument("--hosts", type=int, default=8, help="hosts of the pod (v4-64: 8)")
    args = p.parse_args(argv)

    from pythia_jax.data import demo_data_prefix
    from pythia_jax.data.count import CountSpec, RunData, build_counters, decode_rows, run_count
    from pythia_jax.data.orders import open_order
    from pythia_jax.data.preprocess import write_preshuffled
    from pythia_jax.data.tokenizer import load_tokenizer

    B, W = args.batch_size, args.seq_len + 1
    steps = args.rows // B
    rows = steps * B
    tokens = rows * W
    tmp = tempfile.mkdtemp(prefix="bench_count_")
    neox = open_order(demo_data_prefix(), "neox", seq_len=args.seq_len, seed=1234,
                      train_iters=steps, global_batch=B, cache_prefix=os.path.join(tmp, "maps"))
    prefix = os.path.join(tmp, "document")
    write_preshuffled(neox, prefix, rows, progress=False)
    run = RunData(prefix, "preshuffled", args.seq_len, B)
    chunk_steps = max(1, 4_000_000 // (B * W))

    def memmap_read():
        mm = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r").reshape(-1, W)
        total = 0
        for a in range(0, steps, chunk_steps):
            block = np.array(mm[a * B: min(a + chunk_steps, steps) * B])
            total += int(block[:, 0].sum())  # touch the copy
        return total

    tokenizer = load_tokenizer()

    def plain_decode():  # what one would write: the tokenizer's own batch decode
        mm = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r").reshape(-1, W)
        for a in range(0, steps, chunk_steps):
            block = np.array(mm[a * B: min(a + chunk_steps, steps) * B])
            tokenizer.decode_batch([r.tolist() for r in block], skip_special_tokens=False)

    def table_decode():  # count's own decoder (ByteDecoder), same text
        mm = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r").reshape(-1, W)
        for a in range(0, steps, chunk_steps):
            decode_rows(np.array(mm[a * B: min(a + chunk_steps, steps) * B]))

    numbers = tuple(str(n) for n in range(100))
    specs = {
        "ngram (0..99 as text, 200 variants + 3 phrases)":
            CountSpec(texts=numbers + ("the United States", "New York", "in the")),
        "regex (2 patterns)": CountSpec(regexes=(r"\b\d+ (?:plus|times) \d+\b", r"\bthe\b")),
        "numerals preset (<= 99)": CountSpec(numerals=True, numeral_max=99),
    }
    for spec in specs.values():
        build_counters(spec)  # tokenizer loaded outside the timings
    counter = iter(range(10 ** 6))

    def counted(spec):
        def go():
            out = os.path.join(tmp, f"out{next(counter)}.jsonl")
            run_count(run, spec, out, start=0, stop=steps, progress=False)
        return go

    memmap_read()  # warm the page cache
    t_mm = best_of(args.repeats, memmap_read)
    t_dec = best_of(args.repeats, plain_decode)
    t_tab = best_of(args.repeats, table_decode)
    results = {name: best_of(args.repeats, counted(spec)) for name, spec in specs.items()}

    def rate(t):
        return rows / t, tokens / t

    print(f"rows: {rows:,} of {W} tokens ({tokens / 1e6:.1f}M tokens), pre-shuffled demo data, "
          f"1 process, best of {args.repeats}")
    print(f"{'mode':<50} {'rows/s':>10} {'Mtok/s':>8} {'vs limit':>9}  {'Pile/proc':>10} "
          f"{'Pile/host':>10} {'Pile/pod':>9}")

    def line(name, t, limit):
        r, tk = rate(t)
        one = PILE_TOKENS / tk
        print(f"{name:<50} {r:>10,.0f} {tk / 1e6:>8.2f} "
              f"{'' if limit is None else f'{limit / t:>8.2f}x':>9}  {one / 3600:>9.1f}h "
              f"{one / args.procs_per_host / 3600:>9.2f}h "
              f"{one / args.procs_per_host / args.hosts / 3600:>8.2f}h")

    line("numpy.memmap read (limit for n-grams)", t_mm, None)
    first = next(iter(results))
    line(first, results[first], t_mm)
    line("plain decode: tokenizers decode_batch", t_dec, None)
    line("count's byte-table decode (same text)", t_tab, t_dec)
    for name, t in list(results.items())[1:]:
        line(name, t, t_dec)
    print(f"'vs limit' = rate / limit rate (1.00x = as fast as the read or decode alone). "
          f"Pile = {PILE_TOKENS:.3g} tokens; host = {args.procs_per_host} processes; pod = "
          f"{args.hosts} hosts (v4-64: 32 chips / 4 per host), linear scaling assumed.")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
