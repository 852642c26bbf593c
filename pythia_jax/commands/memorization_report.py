"""``pythia-jax memorization-report``: Poisson tests, score correlations and memorized-set
prediction from per-row memorization results."""

from __future__ import annotations

import argparse

HELP = "analyse per-row memorization results (Poisson tests, correlations, prediction) into a table + PNGs"

DESCRIPTION = """\
Reads the per-row memorization results of 'pythia-jax eval --tasks memorization'
(<out>_details/step<N>_memorization*.npy; directories or files) and writes to --out-dir:

  report.txt / report.json   per checkpoint: memorized fraction, mean score, and the Poisson
                             analysis of memorized rows per window of --window consecutive rows
                             (index of dispersion, chi-square goodness of fit, KS); correlation
                             of per-row scores between checkpoints on the rows all have seen
                             (Pearson, Spearman); each checkpoint's memorized set as a predictor
                             of the last one's (confusion matrix, precision, recall)
  qq_step<N>.png             Q-Q plot of the window counts against Poisson(mean)
  correlation.png            Spearman correlation heat map (two or more checkpoints)

The Poisson analysis needs full sweeps (every training row up to the checkpoint: rows
[0, batch_size * step) in the run's order); sampled results (--mem-sample) get the other
analyses only.

  pythia-jax memorization-report results_details --out-dir mem_report
"""

REPORT_KIND = "memorization_report"  # what --overwrite may replace (io_utils.KIND_NAMES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("details", nargs="+", help="details directories or step<N>_memorization*.npy files")
    parser.add_argument("--out-dir", required=True, help="output directory (written aside, then renamed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    parser.add_argument("--window", type=int, default=512, help="rows per window of the Poisson analysis (512)")
    parser.add_argument("--alpha", type=float, default=0.01, help="significance level (0.01)")
    parser.add_argument("--gen-len", type=int, default=32,
                        help="generated tokens per row, to turn matched counts into scores (32)")
    parser.add_argument("--target", type=int, default=None,
                        help="step whose memorized set the others predict (default: the last)")


def run(args: argparse.Namespace) -> int:
    import json
    import math

    from pythia_jax.analysis import memorization_stats as ms
    from pythia_jax.errors import DataError, PythiaJaxError
    from pythia_jax.io_utils import atomic_output_dir, check_output_dir, json_safe

    if args.window < 1 or not 0 < args.alpha < 1 or args.gen_len < 1:
        raise PythiaJaxError(f"--window and --gen-len must be >= 1 and --alpha in (0, 1); got "
                             f"{args.window}, {args.gen_len}, {args.alpha}")
    check_output_dir(args.out_dir, args.overwrite, kind=REPORT_KIND)
    results = ms.load_results(args.details, gen_len=args.gen_len)
    steps = sorted(results)
    target = steps[-1] if args.target is None else args.target
    if target not in results:
        raise DataError(f"--target {target}: no results for that step; have {', '.join(map(str, steps))}")

    lines = [f"{'step':>8s} {'rows':>9s} {'memorized':>10s} {'score':>7s} {'windows':>7s} {'mean':>7s} "
             f"{'var':>8s} {'disp p':>9s} {'chi2 p':>9s} {'KS p':>9s}  Poisson?"]
    doc: dict = {"alpha": args.alpha, "window": args.window, "steps": {}, "correlations": [], "prediction": []}
    poisson = {}
    for s in steps:
        r = results[s]
        entry = {"rows": int(len(r)), "memorized_fraction": float(r["memorized"].mean()) if len(r) else math.nan,
                 "mean_score": float(r["score"].mean()) if len(r) else math.nan}
        try:
            counts = ms.window_counts(r["row"], r["memorized"], args.window)
            rep = ms.poisson_analysis(counts, window=args.window, alpha=args.alpha)
            poisson[s] = (counts, rep)
            entry["poisson"] = rep.to_json()
            verdict = "rejected" if rep.rejects_poisson else "not rejected"
            tail = (f"{rep.windows:7d} {rep.mean:7.3f} {rep.variance:8.3f} {rep.dispersion.pvalue:9.2e} "
                    f"{rep.gof.pvalue if rep.gof else math.nan:9.2e} {rep.ks.pvalue:9.2e}  {verdict}")
        except DataError as e:
            entry["poisson"] = {"skipped": str(e)}
            tail = f"{'-':>7s} {'-':>7s} {'-':>8s} {'-':>9s} {'-':>9s} {'-':>9s}  ({e})"
        doc["steps"][str(s)] = entry
        lines.append(f"{s:8d} {entry['rows']:9d} {entry['memorized_fraction']:10.5f} {entry['mean_score']:7.4f} {tail}")
    lines.append(f"(Poisson tests at alpha={args.alpha} on memorized rows per {args.window}-row window; "
                 "the verdict is the index-of-dispersion test; KS is conservative on discrete counts)")

    corrs = []
    if len(steps) > 1:
        rows, corrs = ms.score_correlations(results)
        lines.append(f"\nscore correlation on the {len(rows)} rows every checkpoint has seen")
        lines.append(f"{'step a':>8s} {'step b':>8s} {'pearson':>8s} {'spearman':>8s}")
        for c in corrs:
            lines.append(f"{c.step_a:8d} {c.step_b:8d} {c.pearson:8.4f} {c.spearman:8.4f}")
            doc["correlations"].append(c.__dict__)
        lines.append(f"\nmemorized set of each checkpoint as a predictor of step {target}'s")
        lines.append(f"{'source':>8s} {'rows':>9s} {'tp':>7s} {'fp':>7s} {'fn':>7s} {'tn':>9s} "
                     f"{'precision':>9s} {'recall':>7s}")
        for s in steps:
            if s == target:
                continue
            p = ms.predict_memorized(results[s], results[target], s, target)
            doc["prediction"].append(p.to_json())
            lines.append(f"{s:8d} {p.rows:9d} {p.tp:7d} {p.fp:7d} {p.fn:7d} {p.tn:9d} "
                         f"{p.precision:9.4f} {p.recall:7.4f}")
    text = "\n".join(lines)
    with atomic_output_dir(args.out_dir, args.overwrite, kind=REPORT_KIND) as tmp:
        (tmp / "report.txt").write_text(text + "\n")
        # strict JSON: an undefined statistic (precision with no predicted row, a test on
        # constant counts) is null, not the NaN token most JSON readers reject
        (tmp / "report.json").write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False) + "\n")
        for s, (counts, rep) in poisson.items():
            ms.plot_qq(counts, tmp / f"qq_step{s}.png",
                       title=f"step {s}: memorized per {args.window} rows vs Poisson "
                             f"(dispersion p={rep.dispersion.pvalue:.2g})")
        if len(steps) > 1:
            ms.plot_correlations(steps, corrs, tmp / "correlation.png")
    print(text)
    print(f"wrote {args.out_dir}")
    return 0
