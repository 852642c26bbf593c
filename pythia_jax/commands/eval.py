"""``pythia-jax eval``: evaluate checkpoints of a run into one tidy results table."""

from __future__ import annotations

import argparse

HELP = "evaluate checkpoints (zero-shot tasks, perplexity, memorization) into a results table"

DESCRIPTION = """\
Evaluate many checkpoints of a run and write one tidy table (step, task, metric, value, stderr).

  pythia-jax eval --checkpoints runs/pythia-70m --steps 0,1000,143000 \\
      --tasks piqa,arc_easy,arc_challenge,sciq,winogrande --data-dir data/eval --out results.jsonl

--checkpoints is a pythia-jax checkpoint directory or a folder of HF revisions (step1000/ ...).
Zero-shot tasks read <data-dir>/<task>.jsonl (lm-evaluation-harness formats). 'perplexity' needs
--ppl-data. 'memorization' reads the rows each checkpoint has seen as the run read them, from the
run record in its checkpoints (no flags needed; --mem-* flags that disagree are refused); for
weights without a record (HF revisions) every --mem-* data flag is required. Rerunning with
the same --out skips results already there. Per-example outputs go to --details-dir
(default: <out>_details/).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", required=True, help="checkpoint directory or folder of step<N>/ HF dirs")
    parser.add_argument("--steps", required=True, help="e.g. 0,1000,2000 | all | 1000-10000")
    parser.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,sciq,winogrande",
                        help="comma-separated: task names / spec .yaml paths, perplexity, memorization")
    parser.add_argument("--data-dir", default=None, help="directory with the tasks' JSONL files")
    parser.add_argument("--limit", type=int, default=None, help="first N examples/documents per task")
    parser.add_argument("--out", required=True, help="results table: .jsonl or .csv")
    parser.add_argument("--csv", default=None, help="also write the whole table as CSV here at the end")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=None, help="context window (default: the model's)")
    parser.add_argument("--details-dir", default=None, help="per-example outputs (default: <out>_details)")
    parser.add_argument("--stack", type=int, default=1,
                        help="score K checkpoints at a time in one compiled pass (capped to fit memory)")
    parser.add_argument("--max-stack-bytes", type=float, default=None,
                        help="memory budget for --stack in bytes (default: 80%% of the device's)")
    g = parser.add_argument_group("perplexity")
    g.add_argument("--ppl-data", default=None, help="indexed-dataset prefix or .jsonl of texts")
    g.add_argument("--ppl-text-key", default="text")
    g = parser.add_argument_group("memorization (data flags: only for checkpoints without a run record)")
    g.add_argument("--mem-data", default=None, help="training data prefix (indexed dataset)")
    g.add_argument("--mem-order", default=None, choices=("preshuffled", "neox"))
    g.add_argument("--mem-seq-len", type=int, default=None)
    g.add_argument("--mem-rows-per-step", type=int, default=None, help="training rows per step (global batch)")
    g.add_argument("--mem-order-seed", type=int, default=None, help="GPT-NeoX order seed")
    g.add_argument("--mem-train-iters", type=int, default=None,
                   help="training steps the GPT-NeoX index maps were built for")
    g.add_argument("--mem-sample", type=int, default=None,
                   help="score a random sample of the seen rows (default: every seen row)")
    g.add_argument("--mem-seed", type=int, default=0, help="seed of --mem-sample's draw")
    g.add_argument("--mem-chunk-rows", type=int, default=65536, help="rows per resumable part file")
    g.add_argument("--num-hosts", type=int, default=1, help="hosts splitting the memorization chunks")
    g.add_argument("--host-index", type=int, default=0, help="this host's index in [0, --num-hosts)")
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
    if args.stack < 1:
        raise PythiaJaxError(f"--stack {args.stack}: expected K >= 1 checkpoints per pass")
    if args.num_hosts > 1 and tasks != ["memorization"]:
        raise PythiaJaxError(f"--num-hosts {args.num_hosts} splits memorization only; expected --tasks "
                             f"memorization, got {args.tasks}; run the other tasks in a separate command")
    details = args.details_dir or os.path.splitext(args.out)[0] + "_details"
    settings = EvalSettings(
        tasks=tasks, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
        max_len=args.max_len, ppl_data=args.ppl_data, ppl_text_key=args.ppl_text_key,
        mem_data=args.mem_data, mem_order=args.mem_order, mem_seq_len=args.mem_seq_len,
        mem_rows_per_step=args.mem_rows_per_step, mem_order_seed=args.mem_order_seed,
        mem_train_iters=args.mem_train_iters, mem_sample=args.mem_sample, mem_seed=args.mem_seed,
        mem_chunk_rows=args.mem_chunk_rows, num_hosts=args.num_hosts, host_index=args.host_index,
        details_dir=details, progress=not args.no_progress, stack=args.stack,
        max_stack_bytes=None if args.max_stack_bytes is None else int(args.max_stack_bytes))
    table = evaluate_checkpoints(args.checkpoints, steps, settings, args.out)
    if args.csv:
        write_csv(table.rows, args.csv)
    print(f"{len(table.rows)} rows in {args.out}")
    return 0
