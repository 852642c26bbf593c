"""``pythia-jax eval``: evaluate checkpoints of a run into one tidy results table."""

from __future__ import annotations

import argparse

HELP = "evaluate checkpoints (zero-shot tasks, perplexity, memorization) into a results table"

DESCRIPTION = """\
Evaluate many checkpoints of a run and write one tidy table (step, task, metric, value, stderr).

  pythia-jax eval --checkpoints runs/pythia-70m --steps 0,1000,143000 \\
      --tasks piqa,arc_easy,arc_challenge,sciq,winogrande --data-dir data/eval --out results.jsonl

--checkpoints is a pythia-jax checkpoint directory or a folder of HF revisions (step1000/ ...).
Tasks (files under --data-dir):
  piqa arc_easy arc_challenge sciq winogrande lambada_openai logiqa wsc   <task>.jsonl
  crows_pairs (all bias types), crows_pairs_gender     crows_pairs_anonymized.csv
  winobias (type1/type2 x pro/anti; net bias = pro - anti)   winobias/*.txt.dev
  paper = lambada_openai,piqa,winogrande,arc_easy,arc_challenge,sciq,logiqa (+wsc if wsc.jsonl)
  bias  = winobias,crows_pairs_gender
All but winobias run lm-evaluation-harness's own task definitions on the local files (install
the extra: pip install 'pythia-jax[lm_eval]'); without it, piqa/arc/sciq/winogrande fall back to
bundled specs of the same prompts. 'perplexity' needs
--ppl-data, 'memorization' needs --mem-data (the training data in its exact order). Rerunning with
the same --out skips results already there. Per-example outputs go to --details-dir
(default: <out>_details/).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", required=True, help="checkpoint directory or folder of step<N>/ HF dirs")
    parser.add_argument("--steps", required=True, help="e.g. 0,1000,2000 | all | 1000-10000")
    parser.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,sciq,winogrande",
                        help="comma-separated: task names (see above), groups 'paper' / 'bias', spec "
                             ".yaml paths, perplexity, memorization")
    parser.add_argument("--task-system", default="auto", choices=("auto", "harness", "native"),
                        help="harness tasks: lm-evaluation-harness if installed (auto), always, or the "
                             "bundled specs (native; piqa/arc/sciq/winogrande only)")
    parser.add_argument("--bootstrap-iters", type=int, default=100000,
                        help="draws for the harness's bootstrapped stderrs (lambada perplexity); "
                             "0: the harness reports no stderrs at all")
    parser.add_argument("--data-dir", default=None, help="directory with the tasks' JSONL files")
    parser.add_argument("--limit", type=int, default=None, help="first N examples/documents per task")
    parser.add_argument("--out", required=True, help="results table: .jsonl or .csv")
    parser.add_argument("--csv", default=None, help="also write the whole table as CSV here at the end")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=None, help="context window (default: the model's)")
    parser.add_argument("--details-dir", default=None, help="per-example outputs (default: <out>_details)")
    g = parser.add_argument_group("perplexity")
    g.add_argument("--ppl-data", default=None, help="indexed-dataset prefix or .jsonl of texts")
    g.add_argument("--ppl-text-key", default="text")
    g = parser.add_argument_group("memorization")
    g.add_argument("--mem-data", default=None, help="training data prefix (indexed dataset)")
    g.add_argument("--mem-order", default="preshuffled", choices=("preshuffled", "neox"))
    g.add_argument("--mem-seq-len", type=int, default=2048)
    g.add_argument("--mem-rows-per-step", type=int, default=1024, help="training rows per step (global batch)")
    g.add_argument("--mem-sample", type=int, default=None, help="test a random sample of the seen rows")
    g.add_argument("--mem-seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import os

    from pythia_jax.errors import PythiaJaxError
    from pythia_jax.eval.loading import available_steps
    from pythia_jax.eval.runner import EvalSettings, evaluate_checkpoints, parse_steps, write_csv

    if not os.path.exists(args.checkpoints):
        raise PythiaJaxError(f"--checkpoints {args.checkpoints} does not exist")
    steps = parse_steps(args.steps, lambda: available_steps(args.checkpoints))
    if not steps:
        raise PythiaJaxError(f"no steps selected by --steps {args.steps!r}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    details = args.details_dir or os.path.splitext(args.out)[0] + "_details"
    settings = EvalSettings(
        tasks=tasks, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
        max_len=args.max_len, ppl_data=args.ppl_data, ppl_text_key=args.ppl_text_key,
        mem_data=args.mem_data, mem_order=args.mem_order, mem_seq_len=args.mem_seq_len,
        mem_rows_per_step=args.mem_rows_per_step, mem_sample=args.mem_sample, mem_seed=args.mem_seed,
        details_dir=details, progress=not args.no_progress, task_system=args.task_system,
        bootstrap_iters=args.bootstrap_iters)
    table = evaluate_checkpoints(args.checkpoints, steps, settings, args.out)
    if args.csv:
        write_csv(table.rows, args.csv)
    print(f"{len(table.rows)} rows in {args.out}")
    return 0
