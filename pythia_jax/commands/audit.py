"""``pythia-jax audit``: fingerprint every tensor of a checkpoint series and flag what is wrong."""

from __future__ import annotations

import argparse

HELP = "check a series of checkpoints (HF step<N>/ revisions or a checkpoint directory) for duplicates and damage"

DESCRIPTION = """\
Reads every weight file of every step once (BLAKE2b fingerprint, norm and finiteness of every
tensor in the same pass) and flags: consecutive (or any two) steps that are byte-identical, a
shard or tensor identical to another step's (out-of-era shards), missing / truncated / corrupt
files and shards an index lists but lacks, configs that disagree with the rest of the series,
NaN/inf values, and steps whose parameter norm (whole model, embedding or one layer) leaves
the series' trend.

Exit status: 0 nothing found, 1 problems found (listed), 2 bad input.

  pythia-jax audit runs/demo/checkpoints
  pythia-jax audit hub/pythia-70m --out audit.json   # hub/pythia-70m/step0/, step1/, …
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="folder of step<N>/ HF revisions, one HF directory, or a "
                        "pythia-jax checkpoint directory")
    parser.add_argument("--steps", default=None, help="comma-separated steps to audit (default: all)")
    parser.add_argument("--out", default=None, help="also write the full report (every tensor's "
                        "fingerprint) as JSON here")
    parser.add_argument("--norm-window", type=int, default=4,
                        help="neighbours on each side for the norm trend")
    parser.add_argument("--norm-z", type=float, default=6.0,
                        help="robust z-score (MADs) a norm must leave the trend by")
    parser.add_argument("--norm-min-jump", type=float, default=0.1,
                        help="smallest log-norm distance from the trend that is flagged (0.1: about 10%%)")
    parser.add_argument("--quiet", action="store_true", help="no per-step progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    import sys

    from pythia_jax.analysis.audit import audit_series, write_report_json
    from pythia_jax.errors import PythiaJaxError

    steps = None
    if args.steps:
        try:
            steps = [int(s) for s in args.steps.split(",") if s.strip()]
        except ValueError:
            raise PythiaJaxError(f"--steps takes comma-separated integers, got {args.steps!r}") from None
    if args.norm_window < 2 or args.norm_z <= 0 or args.norm_min_jump < 0:
        raise PythiaJaxError("--norm-window must be >= 2, --norm-z > 0 and --norm-min-jump >= 0; got "
                             f"{args.norm_window}, {args.norm_z}, {args.norm_min_jump}")

    if args.out:  # before the (long) audit: replaces an audit report, nothing else
        from pythia_jax.io_utils import check_output_file
        check_output_file(args.out, "report", inputs=[args.directory])

    def progress(record) -> None:
        if not args.quiet:
            print(f"audited {record.label}: {len(record.tensors)} tensors, {record.bytes_read / 1e6:.1f} MB",
                  file=sys.stderr)

    report = audit_series(args.directory, steps=steps, norm_window=args.norm_window, norm_z=args.norm_z,
                          norm_min_jump=args.norm_min_jump, progress=progress)
    print(report.table())
    if args.out:
        print(f"wrote {write_report_json(report, args.out)}")
    return 0 if report.ok else 1
