"""``pythia-jax preshuffle``: raw dataset + GPT-NeoX index maps -> pre-shuffled dataset."""

from __future__ import annotations

import argparse

HELP = "write the training rows of a raw dataset, in GPT-NeoX order, as a pre-shuffled dataset"
DESCRIPTION = """\
Build (or load) the GPT-NeoX index maps of a raw document dataset and write its training rows in
order: one item of SEQ_LEN+1 tokens per row, row j = the j-th training sample, step n = rows
[B*n, B*n+B). With --shards K the .bin is split at byte level into K files
OUT-000NN-of-{K-1}.bin beside OUT.idx, like the Pythia release (21 shards, "of-00020").
The defaults are Pythia's (1024 x 2048, seed 1234, 143,000 steps): pass your run's values otherwise.

Example:
  pythia-jax preshuffle --data data/pile_text_document --out data/preshuffled/document --shards 21
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pythia_jax.commands.argtypes import dataset_prefix, positive_int, seed

    parser.add_argument("--data", required=True, type=dataset_prefix,
                        help="raw dataset prefix (without .bin/.idx); 'demo' = the bundled demo data")
    parser.add_argument("--out", required=True, help="output prefix (writes OUT.idx and OUT.bin or its shards)")
    parser.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per row (each row holds seq_len+1)")
    parser.add_argument("--batch-size", type=positive_int, default=1024, help="global batch (rows per step)")
    parser.add_argument("--seed", type=seed, default=1234, help="GPT-NeoX order seed")
    parser.add_argument("--train-iters", type=positive_int, default=143000,
                        help="training steps the GPT-NeoX maps are built for")
    parser.add_argument("--rows", type=positive_int, default=None,
                        help="rows to write (default: train-iters x batch-size)")
    parser.add_argument("--shards", type=positive_int, default=None,
                        help="split the .bin into this many files (default: one .bin)")


def run(args: argparse.Namespace) -> int:
    from pythia_jax.data.indexed import check_dataset_output
    from pythia_jax.data.orders import open_order
    from pythia_jax.data.preprocess import write_preshuffled
    check_dataset_output(args.out, [args.data])  # before the (long) index-map build
    order = open_order(args.data, "neox", seq_len=args.seq_len, seed=args.seed,
                       train_iters=args.train_iters, global_batch=args.batch_size, verbose=True)
    rows = args.rows if args.rows is not None else args.train_iters * args.batch_size
    write_preshuffled(order, args.out, rows, shards=args.shards)
    print(f"wrote {rows:,} rows of {args.seq_len + 1} tokens to {args.out}")
    return 0
