"""``pythia-jax plot``: a metric of a results table vs. training step, as a PNG."""

from __future__ import annotations

import argparse

HELP = "plot metrics of eval results tables (JSONL/CSV) against training step (log-x); compare runs"
DESCRIPTION = """\
One table: a line per task for --metric. Several tables (e.g. a baseline run and an intervention
branched from it): a panel per task:metric of --panels (default: every task with --metric), a
line per table, labelled by --labels.

Examples:
  pythia-jax plot results.jsonl --metric acc --out acc.png
  pythia-jax plot base.jsonl swap.jsonl --labels baseline,gender_swap \\
      --panels winobias:net_bias,crows_pairs_gender:pct_stereotype,lambada_openai:acc --out bias.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+",
                        help="results tables written by 'pythia-jax eval' (.jsonl or .csv)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated names of the tables' runs (default: the file names)")
    parser.add_argument("--panels", default=None, metavar="TASK:METRIC,...",
                        help="one panel per task:metric, a line per table (with several tables)")
    parser.add_argument("--metric", default="acc", help="metric to plot")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: all with the metric)")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--title", default=None, help="plot title (default: the metric)")


def run(args: argparse.Namespace) -> int:
    import os

    from pythia_jax.errors import DataError
    from pythia_jax.eval.plot import plot_compare, plot_metric
    from pythia_jax.eval.runner import read_table

    for path in args.results:
        if not os.path.exists(path):
            raise DataError(f"{path} does not exist")
    from pythia_jax.io_utils import check_output_file
    check_output_file(args.out, "png", inputs=list(args.results))
    tables = [read_table(p) for p in args.results]
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    if len(tables) == 1 and not args.panels:
        out = plot_metric(tables[0], args.metric, args.out, tasks=tasks, title=args.title)
        print(f"wrote {out}")
        return 0
    labels = ([x.strip() for x in args.labels.split(",")] if args.labels else
              [os.path.splitext(os.path.basename(p))[0] for p in args.results])
    if len(labels) != len(tables) or len(set(labels)) != len(labels):
        raise DataError(f"--labels needs {len(tables)} distinct names, one per table; got {labels}")
    if args.panels:
        panels = []
        for item in args.panels.split(","):
            task, sep, metric = item.strip().partition(":")
            if not sep or not task or not metric:
                raise DataError(f"--panels {item!r}: expected TASK:METRIC (e.g. winobias:net_bias)")
            panels.append((task, metric))
    else:
        found = sorted({r["task"] for rows in tables for r in rows if r["metric"] == args.metric})
        panels = [(t, args.metric) for t in found if tasks is None or t in tasks]
        if not panels:
            raise DataError(f"no table has metric {args.metric!r}")
    out = plot_compare(dict(zip(labels, tables)), panels, args.out, title=args.title)
    print(f"wrote {out} ({len(tables)} runs, {len(panels)} panels)")
    return 0
