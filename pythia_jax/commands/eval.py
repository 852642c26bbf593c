"""``pythia-jax eval``: evaluate checkpoints of a run into one tidy results table."""

from __future__ import annotations

import argparse

HELP = ("evaluate checkpoints (zero-shot, bias and few-shot generation tasks, perplexity, "
        "memorization) into a results table")

DESCRIPTION = """\
Evaluate many checkpoints of a run and write one tidy table (step, task, metric, value, stderr).

  pythia-jax eval --checkpoints runs/pythia-70m --steps 0,1000,143000 \\
      --tasks piqa,arc_easy,arc_challenge,sciq,winogrande --data-dir data/eval --out results.jsonl

--checkpoints is a pythia-jax checkpoint directory (a run's output directory stands for its
checkpoints/ folder), a folder of HF revisions (step1000/ ...) or one HF directory.
Tasks (files under --data-dir):
  piqa arc_easy arc_challenge sciq winogrande lambada_openai logiqa wsc   <task>.jsonl
  crows_pairs (all bias types), crows_pairs_gender     crows_pairs_anonymized.csv
  winobias (type1/type2 x pro/anti; net bias = pro - anti)   winobias/*.txt.dev
  arithmetic (or arithmetic_plus, arithmetic_times)    generated, no file
  triviaqa                                             triviaqa.jsonl
  paper = lambada_openai,piqa,winogrande,arc_easy,arc_challenge,sciq,logiqa (+wsc if wsc.jsonl)
  bias  = winobias,crows_pairs_gender
The zero-shot tasks above winobias run lm-evaluation-harness's own task definitions on the local
files (install the extra: pip install 'pythia-jax[lm_eval]'); without it, piqa/arc/sciq/winogrande
fall back to bundled specs of the same prompts. The few-shot generation tasks arithmetic and
triviaqa give one task per k of --shots, e.g. arithmetic_plus_k4. 'perplexity' needs
--ppl-data. 'memorization' reads the rows each checkpoint has seen as the run read them, from the
run record in its checkpoints (no flags needed; --mem-* flags that disagree are refused); for
weights without a record (HF revisions) every --mem-* data flag is required. Every row records
the checkpoints, the weights and the settings it was computed from; rerunning with the same
--out skips the results already there, and an --out (or --details-dir) holding results of other
checkpoints, weights or settings is refused. Per-example outputs go to --details-dir
(default: <out>_details/).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pythia_jax.commands.argtypes import dataset_prefix, nonneg_int, positive_int, seed

    parser.add_argument("--checkpoints", required=True,
                        help="checkpoint directory (or a run directory holding checkpoints/), folder of "
                             "step<N>/ HF dirs, or one HF directory")
    parser.add_argument("--steps", required=True,
                        help="e.g. 0,1000,2000 | all | 1000-10000 (one HF directory: all, or its step)")
    parser.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,sciq,winogrande",
                        help="comma-separated: task names (see above), groups 'paper' / 'bias', spec "
                             ".yaml paths, perplexity, memorization")
    parser.add_argument("--task-system", default="auto", choices=("auto", "harness", "native"),
                        help="harness tasks: lm-evaluation-harness if installed (auto), always, or the "
                             "bundled specs (native; piqa/arc/sciq/winogrande only)")
    parser.add_argument("--bootstrap-iters", type=nonneg_int, default=100000,
                        help="draws for the harness's bootstrapped stderrs (lambada perplexity); "
                             "0: the harness reports no stderrs at all")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the tasks' files (see above; small slices: tests/data/eval)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="first N examples/documents per task (arithmetic: second operands 1..N; "
                             "default: all)")
    parser.add_argument("--shots", default=None,
                        help="k of the few-shot generation tasks, e.g. 0,2,4,8,16 (default: arithmetic "
                             "0,2,4,8,16; triviaqa 0)")
    parser.add_argument("--out", required=True, help="results table: .jsonl or .csv")
    parser.add_argument("--csv", default=None,
                        help="also write the whole table as CSV here at the end (a .csv path; an existing "
                             "file is replaced only when it is an earlier export of this --out table)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward pass")
    parser.add_argument("--max-len", type=positive_int, default=None, help="context window (default: the model's)")
    parser.add_argument("--details-dir", default=None, help="per-example outputs (default: <out>_details)")
    parser.add_argument("--stack", type=int, default=1,
                        help="score K checkpoints at a time in one compiled pass (capped to fit memory)")
    parser.add_argument("--max-stack-bytes", type=float, default=None,
                        help="memory budget for --stack in bytes (default: 80%% of the device's)")
    g = parser.add_argument_group("perplexity")
    g.add_argument("--ppl-data", default=None, help="indexed-dataset prefix or .jsonl of texts")
    g.add_argument("--ppl-text-key", default="text", help="JSON field holding the text (for .jsonl)")
    g = parser.add_argument_group("memorization (data flags: only for checkpoints without a run record)")
    g.add_argument("--mem-data", default=None, type=dataset_prefix,
                   help="training data prefix (indexed dataset; 'demo' = the bundled demo data)")
    g.add_argument("--mem-order", default=None, choices=("preshuffled", "neox"),
                   help="the order the training data was read in")
    g.add_argument("--mem-seq-len", type=positive_int, default=None, help="training sequence length")
    g.add_argument("--mem-rows-per-step", type=positive_int, default=None,
                   help="training rows per step (global batch)")
    g.add_argument("--mem-order-seed", type=seed, default=None, help="GPT-NeoX order seed")
    g.add_argument("--mem-train-iters", type=positive_int, default=None,
                   help="training steps the GPT-NeoX index maps were built for")
    g.add_argument("--mem-sample", type=positive_int, default=None,
                   help="score a random sample of this many seen rows (default: every seen row)")
    g.add_argument("--mem-seed", type=seed, default=0, help="seed of the --mem-sample draw")
    g.add_argument("--mem-chunk-rows", type=positive_int, default=65536, help="rows per resumable part file")
    g.add_argument("--num-hosts", type=positive_int, default=1, help="hosts splitting the memorization chunks")
    g.add_argument("--host-index", type=nonneg_int, default=0, help="this host's index in [0, --num-hosts)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (ours, lm-evaluation-harness's and the datasets library's)")


def run(args: argparse.Namespace) -> int:
    from pythia_jax.process_env import environment_set

    # the harness's and datasets' bars: tqdm and datasets read these when first imported; the
    # variables are restored after the command (process_env.environment_set)
    quiet = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"} if args.no_progress else {}
    with environment_set(quiet):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import os

    from pythia_jax.errors import PythiaJaxError
    from pythia_jax.eval.loading import NO_CHECKPOINTS, available_steps
    from pythia_jax.eval.runner import EvalSettings, evaluate_checkpoints, parse_steps, write_csv

    if not os.path.exists(args.checkpoints):
        raise PythiaJaxError(f"--checkpoints {args.checkpoints} does not exist")
    checkpoints = args.checkpoints  # a run directory stands for its checkpoints/ (resolve_checkpoint_dir)
    have = available_steps(checkpoints)
    if not have:
        raise PythiaJaxError(f"--checkpoints {args.checkpoints} holds no checkpoints: it {NO_CHECKPOINTS}")
    steps = parse_steps(args.steps, lambda: have)
    if not steps:
        raise PythiaJaxError(f"no steps selected by --steps {args.steps!r}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise PythiaJaxError(f"--tasks {args.tasks!r} names no task; e.g. --tasks piqa,arc_easy (see --help)")
    if args.stack < 1:
        raise PythiaJaxError(f"--stack {args.stack}: expected K >= 1 checkpoints per pass")
    if args.num_hosts > 1 and tasks != ["memorization"]:
        raise PythiaJaxError(f"--num-hosts {args.num_hosts} splits memorization only; expected --tasks "
                             f"memorization, got {args.tasks}; run the other tasks in a separate command")
    shots = None
    if args.shots:
        try:
            shots = sorted({int(k) for k in args.shots.split(",") if k.strip()})
        except ValueError:
            raise PythiaJaxError(f"--shots {args.shots!r}: expected comma-separated integers, e.g. 0,4,16") from None
    details = args.details_dir or os.path.splitext(args.out)[0] + "_details"
    _check_outputs(checkpoints, args.out, args.csv, details)
    settings = EvalSettings(
        tasks=tasks, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
        max_len=args.max_len, ppl_data=args.ppl_data, ppl_text_key=args.ppl_text_key,
        mem_data=args.mem_data, mem_order=args.mem_order, mem_seq_len=args.mem_seq_len,
        mem_rows_per_step=args.mem_rows_per_step, mem_order_seed=args.mem_order_seed,
        mem_train_iters=args.mem_train_iters, mem_sample=args.mem_sample, mem_seed=args.mem_seed,
        mem_chunk_rows=args.mem_chunk_rows, num_hosts=args.num_hosts, host_index=args.host_index,
        details_dir=details, progress=not args.no_progress, shots=shots, stack=args.stack,
        max_stack_bytes=None if args.max_stack_bytes is None else int(args.max_stack_bytes),
        task_system=args.task_system, bootstrap_iters=args.bootstrap_iters)
    table = evaluate_checkpoints(checkpoints, steps, settings, args.out)
    if args.csv:
        write_csv(table.rows, args.csv)
    print(f"{len(table.rows)} rows in {args.out}")
    return 0


def _check_outputs(checkpoints: str, out: str, csv: str | None, details: str) -> None:
    """Before any work: the tables and the details folder are outside the checkpoints (and not
    above them); existing tables are results tables (extended / replaced); an existing details
    folder is not a run, checkpoint or model directory."""
    from pythia_jax.errors import PythiaJaxError
    from pythia_jax.eval.runner import check_csv_export
    from pythia_jax.io_utils import check_inputs, check_output_file, describe_path, path_kind

    check_output_file(out, "table", inputs=[checkpoints])
    if csv:
        check_inputs(csv, [checkpoints])
        check_csv_export(csv, out)  # only an earlier export of --out's table is replaced
    check_inputs(details, [checkpoints])
    if path_kind(details) not in (None, "empty", "other"):
        raise PythiaJaxError(f"--details-dir {details} is {describe_path(details)}; per-example "
                             "outputs need a folder of their own: choose another --details-dir")
