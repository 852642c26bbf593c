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
                        help="comma-separated names of the tables' runs (default: the file names, "
                             "with as many parent folders as it takes to tell them apart)")
    parser.add_argument("--panels", default=None, metavar="TASK:METRIC,...",
                        help="one panel per task:metric, a line per table (with several tables)")
    parser.add_argument("--metric", default="acc", help="metric to plot")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: all with the metric)")
    parser.add_argument("--out", required=True, help="output PNG path (.png)")
    parser.add_argument("--title", default=None, help="plot title (default: the metric)")


def default_labels(paths: list[str]) -> list[str]:
    """One name per table: its file name without the extension, with as many parent folders as
    it takes to make the names distinct (``runs/base/bias.jsonl``, ``runs/swap/bias.jsonl`` ->
    ``base/bias``, ``swap/bias``). ``DataError`` when one table is given twice."""
    import os

    from pythia_jax.errors import DataError

    parts = [os.path.splitext(os.path.abspath(p))[0].split(os.sep) for p in paths]
    for k in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise DataError(f"the same table is given more than once: {', '.join(paths)}")


def run(args: argparse.Namespace) -> int:
    import os

    from pythia_jax.errors import DataError
    from pythia_jax.eval.plot import plot_compare, plot_metric
    from pythia_jax.eval.runner import read_table

    for path in args.results:
        if not os.path.exists(path):
            raise DataError(f"{path} does not exist")
    from pythia_jax.io_utils import check_output_file
    if not args.out.lower().endswith(".png"):
        raise DataError(f"--out {args.out}: the plot is a PNG image; give a path ending in .png")
    check_output_file(args.out, "png", inputs=list(args.results))
    tables = [read_table(p) for p in args.results]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if len(tables) == 1 and not args.panels:
        out = plot_metric(tables[0], args.metric, args.out, tasks=tasks, title=args.title, where=args.results[0])
        print(f"wrote {out}")
        return 0
    if args.labels:
        labels = [x.strip() for x in args.labels.split(",")]
        if len(labels) != len(tables) or len(set(labels)) != len(labels):
            raise DataError(f"--labels needs {len(tables)} distinct names, one per table; got {labels}")
    else:
        labels = default_labels(args.results)
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
