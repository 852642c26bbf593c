"""Benchmark the data path: GPT-NeoX index-map build time/memory and loader throughput.

1. Index maps for a synthetic corpus of ``--docs`` documents (default 20M) with Pile-like
   document lengths (mean ~1,577 tokens = the standard Pile's 332B tokens / 210.6M documents) and
   ``num_samples`` = 90% of one epoch's samples (the Pile's ratio: 147.2M of 162.2M), so one
   epoch as for the standard Pile. Reports wall time per map, the peak of numpy allocations
   (tracemalloc) and the process's max RSS, and extrapolates linearly to the full Pile
   (210,607,728 documents, 162,165,686 samples).
2. Loader throughput on an on-disk synthetic dataset (``--loader-docs`` documents): rows/s of
   the GPT-NeoX order (``NeoxOrder.read_rows``), of the full grain iterator (int32 inputs/labels),
   and of the pre-shuffled order, each against its physical limit measured in the same run:
   plain ``numpy.memmap`` slicing of exactly the same token segments (precomputed, so no map
   lookups), resp. one contiguous memmap slice of the same rows. Files are in the page cache
   (warm reads), so this measures the CPU cost of the loader, not the disk.

    python scripts/bench_data.py                      # ~1-2 minutes, < 2 GB
    python scripts/bench_data.py --docs 2000000       # quicker
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
import tracemalloc

import numpy as np

PILE_DOCS = 210_607_728
PILE_SAMPLES = 162_165_686
MEAN_DOC_TOKENS = 1577


def synthetic_sizes(n: int, seed: int = 0) -> np.ndarray:
    """Pile-like document lengths (lognormal, mean ~1,577 tokens, min 2), int32 [n]."""
    rng = np.random.default_rng(seed)
    sigma = 1.3
    mu = np.log(MEAN_DOC_TOKENS) - sigma ** 2 / 2
    out = np.empty(n, dtype=np.int32)
    step = 1 << 22
    for a in range(0, n, step):
        k = min(step, n - a)
        out[a:a + k] = np.clip(rng.lognormal(mu, sigma, k), 2, 500_000).astype(np.int32)
    return out


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_maps(n_docs: int, seq_len: int, seed: int) -> None:
    from pythia_jax.data import neox_order as no

    sizes = synthetic_sizes(n_docs)
    tokens = int(sizes.sum(dtype=np.int64))
    num_samples = int(0.9 * (tokens - 1) // seq_len)
    print(f"[maps] synthetic corpus: {n_docs:,} documents, {tokens:,} tokens, "
          f"num_samples {num_samples:,}, seq_len {seq_len}")
    rss0 = rss_gb()
    tracemalloc.start()
    rng = np.random.RandomState(seed)
    epochs = no.neox_num_epochs(tokens, seq_len, num_samples)
    t0 = time.perf_counter()
    doc_idx = no.build_doc_idx(n_docs, epochs, rng)
    t1 = time.perf_counter()
    sample_idx = no.build_sample_idx(sizes, doc_idx, seq_len, epochs, tokens)
    t2 = time.perf_counter()
    shuffle_idx = no.build_shuffle_idx(sample_idx.shape[0] - 1, rng)
    t3 = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n_samples = sample_idx.shape[0] - 1
    total = t3 - t0
    print(f"[maps] epochs {epochs}, samples {n_samples:,}; doc_idx {t1 - t0:.1f} s, "
          f"sample_idx {t2 - t1:.1f} s, shuffle_idx {t3 - t2:.1f} s, total {total:.1f} s")
    print(f"[maps] peak numpy memory {peak / 2**30:.2f} GiB (maps themselves "
          f"{(doc_idx.nbytes + sample_idx.nbytes + shuffle_idx.nbytes) / 2**30:.2f} GiB); "
          f"process max RSS {rss_gb():.2f} GiB (was {rss0:.2f} GiB before)")
    # Linear extrapolation: doc_idx and sample_idx scale with documents, shuffle_idx with samples.
    scale_docs = PILE_DOCS / n_docs
    scale_samples = PILE_SAMPLES / n_samples
    est = (t1 - t0 + t2 - t1) * scale_docs + (t3 - t2) * scale_samples
    est_mem = (peak - (doc_idx.nbytes + sample_idx.nbytes + shuffle_idx.nbytes)) + \
        4 * PILE_DOCS + 8 * (PILE_SAMPLES + 1) + 4 * PILE_SAMPLES + 4 * PILE_DOCS
    print(f"[maps] full Pile extrapolation ({PILE_DOCS:,} docs, {PILE_SAMPLES:,} samples): "
          f"~{est / 60:.1f} min (linear; larger shuffles lose some cache locality), "
          f"~{est_mem / 2**30:.1f} GiB (maps + sizes + chunk temporaries)")


def bench_loader(n_docs: int, seq_len: int, batch: int, steps: int, workdir: str,
                 repeats: int = 5) -> None:
    from pythia_jax.data.indexed import IndexedDataset, IndexedDatasetWriter
    from pythia_jax.data.orders import open_order
    from pythia_jax.data.pipeline import make_train_iterator
    from pythia_jax.data.preprocess import write_preshuffled

    rng = np.random.default_rng(1)
    sizes = synthetic_sizes(n_docs, seed=1)
    prefix = os.path.join(workdir, "bench_text_document")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for n in sizes:
            w.add_document(rng.integers(0, 50277, size=int(n), dtype=np.uint16))
    ds = IndexedDataset(prefix)
    train_iters = steps + 3  # the iterator reads steps 1..steps, and prefetches 2 more
    order = open_order(prefix, "neox", seq_len=seq_len, seed=1234, train_iters=train_iters,
                       global_batch=batch, cache_prefix=os.path.join(workdir, "maps"))
    print(f"[loader] dataset: {n_docs:,} documents, {ds.num_tokens:,} tokens "
          f"({os.path.getsize(prefix + '.bin') / 2**20:.0f} MiB); {steps} steps of {batch} rows "
          f"x {seq_len + 1} tokens")

    # Precompute the token segments of the same rows (steps 1..steps) for the plain-memmap peer.
    segments = []
    for n in range(1, steps + 1):
        rows = np.arange(n * batch, (n + 1) * batch)
        samples = np.asarray(order.maps.shuffle_idx[rows], dtype=np.int64)
        _, items, starts, lengths = order.maps.sample_segments(samples, ds.sizes)
        segments.append(list(zip((ds.pointers[items] // 2 + starts).tolist(), lengths.tolist())))
    mm = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r")
    mm_view = mm.view(np.ndarray)  # the same map without the np.memmap subclass per slice

    def peer_neox(m=mm):
        for segs in segments:
            np.concatenate([m[a:a + k] for a, k in segs]).reshape(batch, seq_len + 1)

    def ours_neox():
        for n in range(1, steps + 1):
            order.read_rows(n * batch, (n + 1) * batch)

    def ours_pipeline(num_threads):
        # Steady state, as in training: the iterator (and its prefetch threads) is made once and
        # warmed up; each timed run takes the next ``steps`` batches. Creating it per run would
        # time the thread pool's start and the prefetched batches that run never takes.
        it = make_train_iterator(prefix, order=order, seq_len=seq_len, global_batch=batch,
                                 seed=1234, train_iters=train_iters, process_index=0,
                                 process_count=1, num_threads=num_threads,
                                 prefetch=2 if num_threads else 0)

        def run():
            it.set_step(0)
            next(it)  # untimed: step 0 read and the prefetch buffer filling
            t = time.perf_counter()
            for _ in range(steps):
                next(it)
            return time.perf_counter() - t
        return run

    def interleaved(fns: dict, repeats: int) -> dict:
        """rows/s of each function, run in turns ``repeats`` times after a warm-up (the machine
        is shared: a ratio is taken within one turn, then the median and range over turns)."""
        for fn in fns.values():
            fn()  # warm the page cache and code paths
        out = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                t = time.perf_counter()
                took = fn()  # a function may time its own part and return the seconds
                out[k].append(steps * batch / (took or time.perf_counter() - t))
        return out

    def report(res: dict, peer_key: str, k: str) -> str:
        ratios = sorted(a / b for a, b in zip(res[k], res[peer_key]))
        return (f"{np.median(res[k]):,.0f} rows/s ({np.median(ratios):.2f}x, "
                f"{ratios[0]:.2f}-{ratios[-1]:.2f})")

    res = interleaved({"peer": peer_neox, "view": lambda: peer_neox(mm_view), "ours": ours_neox,
                       "pipe0": ours_pipeline(0), "pipe2": ours_pipeline(2)}, repeats)
    print(f"[loader] neox order ({repeats} interleaved turns; rows/s median, ratio to the peer "
          f"median and range): plain memmap segments {np.median(res['peer']):,.0f} rows/s "
          f"(uint16) | NeoxOrder.read_rows {report(res, 'peer', 'ours')} | grain iterator, int32 "
          f"inputs/labels: no threads {report(res, 'peer', 'pipe0')}, 2 prefetch threads "
          f"{report(res, 'peer', 'pipe2')}")
    print(f"[loader] against the same segments sliced from a plain ndarray view of the map "
          f"{np.median(res['view']):,.0f} rows/s: grain iterator no threads "
          f"{report(res, 'view', 'pipe0')}, 2 prefetch threads {report(res, 'view', 'pipe2')}")

    pre_prefix = os.path.join(workdir, "pre", "document")
    write_preshuffled(order, pre_prefix, train_iters * batch, shards=3, progress=False)
    pre = open_order(pre_prefix, "preshuffled", seq_len=seq_len)
    pre_single = os.path.join(workdir, "pre1", "document")
    write_preshuffled(order, pre_single, train_iters * batch, progress=False)
    pre1 = open_order(pre_single, "preshuffled", seq_len=seq_len)
    mm_pre = np.memmap(pre_single + ".bin", dtype=np.uint16, mode="r")
    w = seq_len + 1

    def peer_pre():
        for n in range(steps):
            np.array(mm_pre[n * batch * w:(n + 1) * batch * w]).reshape(batch, w)

    def ours_pre(o):
        def f():
            for n in range(steps):
                np.array(o.read_rows(n * batch, (n + 1) * batch))  # materialise, like the peer
        return f

    res = interleaved({"peer": peer_pre, "one": ours_pre(pre1), "shards": ours_pre(pre)}, repeats)
    print(f"[loader] pre-shuffled: plain memmap slice {np.median(res['peer']):,.0f} rows/s | "
          f"PreshuffledOrder {report(res, 'peer', 'one')} | 3-shard stream "
          f"{report(res, 'peer', 'shards')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20_000_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--loader-docs", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="interleaved turns of the loader runs")
    p.add_argument("--skip-maps", action="store_true")
    p.add_argument("--skip-loader", action="store_true")
    args = p.parse_args()
    if not args.skip_maps:
        bench_maps(args.docs, args.seq_len, args.seed)
    if args.skip_loader:
        return
    workdir = tempfile.mkdtemp(prefix="bench_data_")
    try:
        bench_loader(args.loader_docs, args.seq_len, args.batch, args.steps, workdir,
                     args.repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
