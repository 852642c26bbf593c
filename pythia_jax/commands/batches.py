"""``pythia-jax batches``: print or save the token rows of training steps a..b (inclusive)."""

from __future__ import annotations

import argparse

HELP = "show or save the exact training rows of steps START..END (either data order)"
DESCRIPTION = """\
The rows of steps START..END inclusive: rows [BATCH*START, BATCH*(END+1)) of the training order
(the original Pythia viewer's off-by-one, which returned one stray row for the last batch, is not
reproduced). --out FILE.npy saves them as uint16 [rows, SEQ_LEN+1]; without --out they are
printed (token ids, or text with --decode).

With --checkpoints DIR (a run directory or its checkpoints/), the data settings are the ones the
run recorded in its checkpoints, so the rows are the ones it trained on; data flags given beside it
must agree with the record (a --data copy with the same documents and tokens is accepted).
Without it, unset flags take Pythia's values (batch 1024, seq 2048, seed 1234, 143000 steps).

Examples:
  pythia-jax batches --checkpoints runs/demo --start 0 --end 0 --decode --rows 2
  pythia-jax batches --data pile_text_document --order neox --start 0 --end 0 --out step0.npy
  pythia-jax batches --data preshuffled/document --order preshuffled --start 1000 --end 1000 \\
      --decode --rows 2
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", default=None,
                        help="a run's directory or checkpoints: read the data settings it recorded")
    parser.add_argument("--step", type=int, default=None,
                        help="with --checkpoints: the checkpoint step whose record is read (default newest)")
    parser.add_argument("--data", default=None,
                        help="dataset prefix without .bin/.idx (for sharded pre-shuffled data, "
                             "the .idx prefix; the shards are found beside it)")
    parser.add_argument("--order", choices=("preshuffled", "neox"), default=None,
                        help="default preshuffled")
    parser.add_argument("--start", type=int, required=True, help="first step (0-based)")
    parser.add_argument("--end", type=int, required=True, help="last step, inclusive")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (rows per step), default 1024")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048")
    parser.add_argument("--seed", type=int, default=None, help="GPT-NeoX order seed, default 1234")
    parser.add_argument("--train-iters", type=int, default=None,
                        help="training steps the GPT-NeoX maps were built for, default 143000")
    parser.add_argument("--out", default=None, help="save uint16 [rows, seq_len+1] to this .npy file")
    parser.add_argument("--decode", action="store_true", help="print the rows as text")
    parser.add_argument("--rows", type=int, default=None,
                        help="when printing, show only the first N rows")


def run(args: argparse.Namespace) -> int:
    import os

    import numpy as np

    from pythia_jax.data.indexed import save_npy_atomic
    from pythia_jax.data.run_data import RunData
    from pythia_jax.errors import DataError

    if args.start < 0 or args.end < args.start:
        raise DataError(f"bad step range --start {args.start} --end {args.end}")
    flags = dict(data=args.data, order=args.order, seq_len=args.seq_len, global_batch=args.batch_size,
                 seed=args.seed, train_iters=args.train_iters)
    if args.checkpoints:
        run_data = RunData.from_checkpoints(args.checkpoints, args.step, what=FLAG_NAMES, **flags)
        if args.end >= run_data.train_iters:
            raise DataError(f"steps {args.start}..{args.end}: the run has {run_data.train_iters} steps "
                            f"(0..{run_data.train_iters - 1})")
    else:
        if args.data is None:
            raise DataError("give --data (a dataset prefix) or --checkpoints (a run's directory)")
        pythia = dict(order="preshuffled", seq_len=2048, global_batch=1024, seed=1234, train_iters=143000)
        run_data = RunData.from_flags(**{k: pythia[k] if v is None and k in pythia else v
                                         for k, v in flags.items()}, what=FLAG_NAMES)
    order = run_data.open_order()
    args.batch_size, args.order = run_data.global_batch, run_data.order
    first, stop = args.batch_size * args.start, args.batch_size * (args.end + 1)
    if stop > len(order):
        raise DataError(f"{order.name}: steps {args.start}..{args.end} need rows [{first}, {stop}), "
                        f"the {args.order} order has {len(order)} rows "
                        f"(last full step {len(order) // args.batch_size - 1})")
    rows = np.asarray(run_data.read_rows(order, np.arange(first, stop))).astype(np.uint16)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        save_npy_atomic(args.out, rows)
        print(f"saved rows [{first}, {stop}) as {rows.dtype} {list(rows.shape)} to {args.out}")
        return 0
    shown = rows if args.rows is None else rows[: args.rows]
    if args.decode:
        from pythia_jax.data.tokenizer import decode
        for k, row in enumerate(shown):
            print(f"=== step {(first + k) // args.batch_size} row {first + k} ===")
            print(decode(row))
    else:
        np.set_printoptions(threshold=20, linewidth=120)
        for k, row in enumerate(shown):
            print(f"step {(first + k) // args.batch_size} row {first + k}: {row}")
    return 0


FLAG_NAMES = {"data": "--data", "order": "--order", "seq_len": "--seq-len", "global_batch": "--batch-size",
              "seed": "--seed", "train_iters": "--train-iters"}
