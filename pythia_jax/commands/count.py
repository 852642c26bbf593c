"""``pythia-jax count``: count terms over the training rows of steps [START, STOP), by step window."""

from __future__ import annotations

import argparse

HELP = "count n-grams / regex matches / numerals in the training rows seen up to each step"
DESCRIPTION = """\
Counts over the training rows of steps [START, STOP) (rows [BATCH*START, BATCH*STOP)) in the run's
exact order (the same data flags as 'pythia-jax batches'), per step window, with the cumulative
count at each window end: the count at checkpoint step c is over steps [START, c).

What to count (any mix):
  --text WORD         token n-gram of WORD, as written (variant "bare") and after a leading space
                      (variant "space"), tokenized with the Pythia tokenizer; within rows only
  --ids 123,456       an id sequence (variant "ids")
  --regex PATTERN     matches in each decoded row (Python re), per pattern or --per-match
  --preset numerals   the Pythia paper's term-frequency rule: integers of 1-5 digits with another
                      integer within 1-3 words, per number and per unordered pair
Windows: --window W (every W steps) or --at-steps 1,2,4,...,STOP (e.g. checkpoint steps).

Output: --out FILE.jsonl or FILE.csv, columns window_start, window_end, term, variant, count,
cumulative; with --locate also FILE.locations.jsonl or FILE.locations.csv, in the table's format
(term, variant, step, row_in_step, offset, offset_unit, token_offset), published together with
the table. Finished windows are kept in FILE.parts/ until the tables are written, so an
interrupted count continues with --resume. --workers N counts windows in N local processes;
--num-hosts H --host-index i counts every H-th window and writes FILE.host-0000i-of-0000H.json,
which 'pythia-jax count-merge' joins into the single-host table.

With --checkpoints DIR no data flag is needed: the rows are the ones the run trained on (its recorded
source, order, seed, batch, seq_len, train_iters and transform). Without it, unset data flags take
Pythia's values.

Examples:
  pythia-jax count --checkpoints runs/demo --text Paris --at-steps 50,100,200 --out paris.csv
  pythia-jax count --data demo --order neox --batch-size 8 --seq-len 128 --train-iters 200 \\
      --preset numerals --numeral-max 99 --at-steps 1,2,4,8,16,50,100,150,200 --out numerals.csv
  pythia-jax count --data preshuffled/document --text Paris --ids 50276 --window 13000 \\
      --stop 143000 --workers 16 --out paris.jsonl
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pythia_jax.commands.argtypes import nonneg_int, positive_int, text
    from pythia_jax.commands.batches import add_row_flags

    g = parser.add_argument_group("data (as for 'pythia-jax batches')")
    add_row_flags(g, "a run's directory or its checkpoints/: count the rows it trained on, with the "
                     "data settings it recorded (data flags given beside it must agree)")
    s = parser.add_argument_group("steps")
    s.add_argument("--start", type=nonneg_int, default=0, help="first step counted")
    s.add_argument("--stop", type=positive_int, default=None,
                   help="step after the last one counted (exclusive; default: the last --at-steps, "
                        "else every training step the data holds)")
    s.add_argument("--window", type=int, default=None, help="window length in steps")  # checked by run_count
    s.add_argument("--at-steps", default=None, help="comma-separated window ends, e.g. 1,2,4,8")
    t = parser.add_argument_group("terms")
    t.add_argument("--text", action="append", default=[], type=text, help="text term (repeatable)")
    t.add_argument("--terms-file", default=None, help="text terms, one per line")
    t.add_argument("--ids", action="append", default=[], help="token-id sequence, e.g. 123,456")
    t.add_argument("--regex", action="append", default=[], type=text, help="pattern over decoded rows")
    t.add_argument("--per-match", action="store_true", help="count regex matches per matched text")
    t.add_argument("--preset", choices=("numerals",), default=None,
                   help="numerals: the Pythia paper's term-frequency rule (see above)")
    t.add_argument("--numeral-max", type=nonneg_int, default=None,
                   help="report numbers (and pairs) up to this value only, e.g. 99; every number "
                        "up to it is listed in every window, zeros included")
    t.add_argument("--locate", action="store_true",
                   help="also write where terms occur: OUT.locations.jsonl / .csv, as --out")
    t.add_argument("--max-locations", type=nonneg_int, default=1000,
                   help="locations kept per term and variant (first in training order)")
    o = parser.add_argument_group("output and parallelism")
    o.add_argument("--out", required=True, help="table: .jsonl or .csv")
    o.add_argument("--resume", action="store_true",
                   help="continue an interrupted count (or redo a finished one of the same terms)")
    o.add_argument("--workers", type=positive_int, default=1, help="local processes")
    o.add_argument("--num-hosts", default="1", help="hosts sharing the windows, or 'auto' (JAX)")
    o.add_argument("--host-index", default="0", help="this host's index, or 'auto' (JAX)")
    o.add_argument("--chunk-steps", type=positive_int, default=None,
                   help="steps read at once (default: about 4M tokens)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _int_list(text: str, flag: str) -> list[int]:
    from pythia_jax.data.count import CountError

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise CountError(f"{flag} {text!r}: expected comma-separated steps such as 1,2,4,8")
    return [int(p) for p in parts]


def _hosts(args) -> tuple[int, int]:
    from pythia_jax.data.count import CountError

    if "auto" in (args.num_hosts, args.host_index):
        import jax

        jax.distributed.initialize()
        return jax.process_count(), jax.process_index()
    try:
        return int(args.num_hosts), int(args.host_index)
    except ValueError:
        raise CountError(f"--num-hosts {args.num_hosts} --host-index {args.host_index}: expected "
                         "integers or 'auto'") from None


def run(args: argparse.Namespace) -> int:
    import logging

    from pythia_jax.data.count import CountError, CountSpec, parse_ids, run_count

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    texts = list(args.text)
    if args.terms_file:
        try:
            with open(args.terms_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except FileNotFoundError:
            raise CountError(f"--terms-file {args.terms_file}: file not found") from None
        except UnicodeDecodeError as e:
            raise CountError(f"--terms-file {args.terms_file}: not UTF-8 text (byte {e.start}); re-encode the "
                             "file as UTF-8") from None
    spec = CountSpec(texts=tuple(texts), ids=tuple(parse_ids(s) for s in args.ids),
                     regexes=tuple(args.regex), per_match=args.per_match,
                     numerals=args.preset == "numerals", numeral_max=args.numeral_max,
                     locate=args.locate, max_locations=args.max_locations)
    from pythia_jax.commands.batches import run_data_from_args

    run_data = run_data_from_args(args)
    at_steps = _int_list(args.at_steps, "--at-steps") if args.at_steps is not None else None
    num_hosts, host_index = _hosts(args)
    written = run_count(run_data, spec, args.out, start=args.start, stop=args.stop,
                        window=args.window, at_steps=at_steps, resume=args.resume,
                        workers=args.workers, num_hosts=num_hosts, host_index=host_index,
                        chunk_steps=args.chunk_steps, progress=not args.no_progress)
    for what, path in written.items():
        print(f"wrote {what}: {path}")
    return 0
