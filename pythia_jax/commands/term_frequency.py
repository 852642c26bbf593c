"""``pythia-jax term-frequency``: few-shot arithmetic accuracy against the operand's training count."""

from __future__ import annotations

import argparse

HELP = "plot arithmetic accuracy against operand counts seen by each checkpoint; frequency-gap table"
DESCRIPTION = """\
Joins a numeral count table ('pythia-jax count --preset numerals --numeral-max 99 --at-steps
<checkpoint steps>', counted from step 0) with the per-item arithmetic results of 'pythia-jax eval
--tasks arithmetic' (its --details-dir). A table whose windows do not start at step 0, leave gaps,
or do not list an operand (e.g. a smaller --numeral-max) is refused:

  --out PLOT.png   k-shot accuracy (--shots, default 16) against the count of the first operand
                   up to each checkpoint, in --bins log-spaced count bins (default 20, over
                   --count-range, default the observed range); one line per checkpoint, one panel
                   per operation
  --table T.csv    mean accuracy of the 10 most frequent operands minus the 10 least frequent,
                   x100, per (operation, step, k) for k in --table-shots (default 0,4,16);
                   also printed

Example (the Pythia paper's figure: bins 1e5..2e8, k=16):
  pythia-jax term-frequency --counts numerals.csv --details-dir results_details \\
      --out frequency.png --table frequency_gap.csv --count-range 1e5,2e8
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--counts", required=True,
                        help="count table (.csv/.jsonl) of 'pythia-jax count --preset numerals'")
    parser.add_argument("--details-dir", required=True, help="--details-dir of 'pythia-jax eval --tasks arithmetic'")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--table", default=None, help="frequency-gap table (.csv)")
    from pythia_jax.commands.argtypes import nonneg_int, positive_int

    parser.add_argument("--shots", type=nonneg_int, default=16, help="k of the plotted accuracy")
    parser.add_argument("--table-shots", default="0,4,16", help="k of the gap table")
    parser.add_argument("--bins", type=positive_int, default=20, help="log-spaced count bins of the plot")
    parser.add_argument("--count-range", default=None, help="low,high of the bins, e.g. 1e5,2e8")
    parser.add_argument("--top", type=positive_int, default=10, help="operands at each end of the gap")


def run(args: argparse.Namespace) -> int:
    import csv
    import os

    from pythia_jax.analysis import term_frequency as tf
    from pythia_jax.data.count import read_table
    from pythia_jax.errors import DataError, PythiaJaxError

    if not os.path.exists(args.counts):
        raise DataError(f"--counts {args.counts} does not exist; write it with 'pythia-jax count --preset numerals'")
    for path in (args.out, args.table):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise PythiaJaxError(f"{path}: its folder does not exist")
    from pythia_jax.io_utils import atomic_files, check_output_file

    check_output_file(args.out, "png", inputs=[args.counts, args.details_dir])
    if args.table:
        check_output_file(args.table, "gap_table", inputs=[args.counts, args.details_dir, args.out])
    try:
        table_shots = [int(k) for k in args.table_shots.split(",") if k.strip()]
        count_range = tuple(float(x) for x in args.count_range.split(",")) if args.count_range else None
    except ValueError:
        raise PythiaJaxError("--table-shots takes integers (e.g. 0,4,16), --count-range two numbers "
                             "(e.g. 1e5,2e8)") from None
    if count_range is not None and len(count_range) != 2:
        raise PythiaJaxError(f"--count-range {args.count_range!r}: expected low,high")
    accs = tf.read_operand_accuracy(args.details_dir)
    steps = sorted({key[2] for key in accs})
    operands = sorted({x for acc in accs.values() for x in acc})
    counts = tf.operand_counts(read_table(args.counts), steps, operands)
    rows = tf.gap_table(counts, accs, table_shots, n=args.top)  # refused before the figure is written
    out = tf.plot_frequency(counts, accs, args.out, k=args.shots, bins=args.bins, count_range=count_range)
    print(f"wrote {out}")
    print(f"mean accuracy of the {args.top} most frequent minus the {args.top} least frequent operands, x100")
    print(f"{'operation':<10}{'step':>10}{'k':>4}{'gap':>9}")
    for r in rows:
        print(f"{r['operation']:<10}{r['step']:>10}{r['k']:>4}{r['gap']:>9.2f}")
    if args.table:
        with atomic_files(args.table) as (tmp,), open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=("operation", "step", "k", "gap"))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.table}")
    return 0
