#!/usr/bin/env python
"""Throughput of ``pythia-jax audit`` against a plain ``hashlib`` read of the same files.

Writes a series of ``--steps`` HF revisions (``step<N>/``) of a random model of the given preset's
shape (default pythia-70m) as fp16 safetensors in ``--shard-size`` shards, then times

  plain   BLAKE2b of every weight file with a read-and-hash loop (hashlib, 8 MiB reads, one thread)
  audit   audit_series(): header checks, a BLAKE2b fingerprint of every tensor, its norm,
          non-finite count and min/max in the same pass, then the series analysis

alternately, ``--repeat`` times each (the fastest is shown), and prints the audit/plain time
ratio. Both read the files from the page cache (they were just written), so this compares
the work per byte, not the disk; on a cold disk both wait for the same reads.

  python scripts/bench_audit.py [--model pythia-70m] [--steps 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pythia-70m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--shard-size", default="100MB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import numpy as np

    from pythia_jax.analysis import audit
    from pythia_jax.config import ModelConfig
    from pythia_jax.convert import hf as hfc

    config = ModelConfig.preset(args.model)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_audit_")
    os.makedirs(work, exist_ok=True)
    try:
        rng = np.random.default_rng(0)
        for k in range(args.steps):
            params: dict = {}
            for path, shape in hfc.param_shapes(config).items():
                node = params
                for p in path[:-1]:
                    node = node.setdefault(p, {})
                node[path[-1]] = rng.standard_normal(shape, np.float32) * 0.02
            hfc.write_hf_dir(config, params, os.path.join(work, f"step{k * 1000}"), dtype="float16",
                             shard_size=args.shard_size, overwrite=True)
            del params
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(work) for f in fs if f.endswith(".safetensors"))
        plain, audited = [], []
        nbytes = 0
        for _ in range(args.repeat):
            t, nbytes = audit.plain_hash_seconds(files)
            plain.append(t)
            t0 = time.perf_counter()
            report = audit.audit_series(work)
            audited.append(time.perf_counter() - t0)
        gb = nbytes / 1e9
        print(f"{args.model}: {args.steps} steps, {len(files)} files, {gb:.2f} GB, {os.cpu_count()} CPUs")
        print(f"plain hashlib blake2b read: {min(plain):.3f} s ({gb / min(plain):.2f} GB/s)")
        print(f"audit (hash + norm + finiteness + analysis): {min(audited):.3f} s ({gb / min(audited):.2f} GB/s)")
        print(f"ratio audit/plain: {min(audited) / min(plain):.2f}")
        print(f"findings: {len(report.errors())} (a random series: norm trend has no outliers expected)")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
