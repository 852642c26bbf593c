"""``pythia-jax plot``: a metric of a results table vs. training step, as a PNG."""

from __future__ import annotations

import argparse

HELP = "plot a metric of an eval results table (JSONL/CSV) against training step (log-x)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results table written by 'pythia-jax eval' (.jsonl or .csv)")
    parser.add_argument("--metric", default="acc", help="metric to plot")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: all with the metric)")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--title", default=None, help="plot title (default: the metric)")


def run(args: argparse.Namespace) -> int:
    import os

    from pythia_jax.errors import DataError
    from pythia_jax.eval.plot import plot_metric
    from pythia_jax.eval.runner import read_table

    if not os.path.exists(args.results):
        raise DataError(f"{args.results} does not exist")
    from pythia_jax.io_utils import check_output_file
    check_output_file(args.out, "png", inputs=[args.results])
    rows = read_table(args.results)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    out = plot_metric(rows, args.metric, args.out, tasks=tasks, title=args.title)
    print(f"wrote {out}")
    return 0
