"""``pythia-jax batches``: print or save the token rows of training steps a..b (inclusive)."""

from __future__ import annotations

import argparse

HELP = "show or save the exact training rows of steps START..END (either data order)"
DESCRIPTION = """\
The rows of steps START..END inclusive: rows [BATCH*START, BATCH*(END+1)) of the training order
(the original Pythia viewer's off-by-one, which returned one stray row for the last batch, is not
reproduced). --out FILE.npy saves them as uint16 [rows, SEQ_LEN+1]; without --out they are
printed (token ids, or text with --decode; --decode and --rows are refused with --out).

The defaults of --batch-size, --seq-len, --seed and --train-iters are Pythia's (1024 rows of
2048+1 tokens, seed 1234, 143,000 steps): for any other run pass that run's values, since the
GPT-NeoX order depends on all four. --data demo is the bundled demo data (as in configs/demo.gin).
With --checkpoints DIR (a run's directory or its checkpoints/) no data flag is needed: the settings
are the ones the run recorded in its checkpoints (its transform included), so the rows are the ones
it trained on; data flags given beside it must agree with the record (a --data copy with the same
documents and tokens is accepted). Checkpoints that hold no run record (HF revisions, converted
weights) need every data flag: the defaults above apply only without --checkpoints.

Examples:
  pythia-jax batches --checkpoints runs/demo --start 0 --end 0 --rows 2 --decode   # a run's first step
  pythia-jax batches --data demo --order neox --batch-size 8 --seq-len 128 --train-iters 200 \\
      --start 0 --end 0 --rows 2 --decode            # the first step of configs/demo.gin
  pythia-jax batches --data pile_text_document --order neox --start 0 --end 0 --out step0.npy
  pythia-jax batches --data preshuffled/document --order preshuffled --start 1000 --end 1000 \\
      --decode --rows 2
  pythia-jax batches --data demo --order neox --batch-size 8 --seq-len 128 --train-iters 200 \\
      --start 100 --end 100 --transform gender_swap --decode   # audit an intervention: [he→she]

--transform NAME applies a row transform (pythia_jax.data.transforms: gender_swap,
gender_swap_tokenmap_2022, gender_swap_text_2023, or package.module:function) to the rows of the
steps in --transform-steps (default: all shown), as training with DataConfig.transform would;
with --decode each changed span is shown as [old→new], and a line per step counts the changes.
With --checkpoints the rows already carry the run's recorded transform; --transform,
--transform-param and --transform-steps are data flags like the others: each must equal the
record (a run without a transform refuses them), and --transform then shows the changes.
--step needs --checkpoints; --decode and --rows are for printing, not for --out.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pythia_jax.commands.argtypes import nonneg_int, positive_int

    parser.add_argument("--start", type=nonneg_int, required=True, help="first step (0-based)")
    parser.add_argument("--end", type=nonneg_int, required=True, help="last step, inclusive")
    add_row_flags(parser, "a run's directory or its checkpoints/: use the data settings it recorded")
    parser.add_argument("--out", default=None, help="save uint16 [rows, seq_len+1] to this .npy file")
    parser.add_argument("--decode", action="store_true", help="print the rows as text")
    parser.add_argument("--rows", type=positive_int, default=None,
                        help="when printing, show only the first N rows (default: all)")
    parser.add_argument("--transform", default=None, metavar="NAME",
                        help="apply this row transform (a built-in name or package.module:function)")
    parser.add_argument("--transform-param", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of the transform, e.g. direction=f2m (repeatable)")
    parser.add_argument("--transform-steps", default=None, metavar="A,B",
                        help="apply the transform only to steps in [A, B) (default: every step)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from pythia_jax.data.indexed import save_npy_atomic
    from pythia_jax.errors import DataError

    if args.end < args.start:
        raise DataError(f"--end {args.end} is before --start {args.start}; --end is the last step, inclusive "
                        f"(use --end {args.start} for one step)")
    if args.out and args.decode:
        raise DataError("--decode prints the rows as text, --out saves them as token ids; give one of them")
    if args.out and args.rows is not None:
        raise DataError("--rows limits the rows printed; --out saves every row of the steps (drop --rows)")
    run_data = run_data_from_args(args, transform=args.transform,
                                  transform_params=_transform_params(args.transform_param) or None,
                                  transform_steps=_transform_steps(args.transform_steps))
    run_data.check_steps(args.start, args.end + 1, f"steps {args.start}..{args.end}")
    args.data, args.order, args.batch_size = run_data.prefix(), run_data.order, run_data.global_batch
    args.seq_len, args.train_iters = run_data.seq_len, run_data.train_iters
    if args.out:  # replaces an .npy file, never the dataset or anything else
        from pythia_jax.io_utils import check_output_file
        check_output_file(args.out, "npy", inputs=[args.data + ".bin", args.data + ".idx"])
    order = run_data.open_order()
    first, stop = args.batch_size * args.start, args.batch_size * (args.end + 1)
    if stop > len(order):
        raise DataError(f"{order.name}: steps {args.start}..{args.end} need rows [{first}, {stop}), "
                        f"the {args.order} order has {len(order)} rows "
                        f"(last full step {len(order) // args.batch_size - 1})")
    stored = np.asarray(order.read_rows(first, stop))
    rows = np.asarray(run_data.as_trained(stored, first)).astype(np.uint16)  # the transform applied
    original = rows
    if args.transform:  # show what the transform changed: the rows as stored, and a line per step
        original = stored.astype(np.uint16)
        _report_changes(run_data, original, rows, first, args.batch_size)
    if args.out:
        save_npy_atomic(args.out, rows)
        print(f"saved rows [{first}, {stop}) as {rows.dtype} {list(rows.shape)} to {args.out}")
        return 0
    shown = rows if args.rows is None else rows[: args.rows]
    if args.decode:
        from pythia_jax.data.tokenizer import decode
        for k, row in enumerate(shown):
            print(f"=== step {(first + k) // args.batch_size} row {first + k} ===")
            print(decode(row) if not args.transform else _marked(original[k], row, decode))
    else:
        np.set_printoptions(threshold=20, linewidth=120)
        for k, row in enumerate(shown):
            print(f"step {(first + k) // args.batch_size} row {first + k}: {row}")
    return 0


def add_row_flags(parser, checkpoints_help: str) -> None:
    """The flags that decide which rows a step holds (``batches``, ``count``): ``--checkpoints``
    (and ``--step``), or ``--data``/``--order`` and the four GPT-NeoX order settings, whose
    defaults are Pythia's only without ``--checkpoints``."""
    from pythia_jax.commands.argtypes import dataset_prefix, nonneg_int, positive_int, seed

    parser.add_argument("--checkpoints", default=None, help=checkpoints_help)
    parser.add_argument("--step", type=nonneg_int, default=None,
                        help="with --checkpoints: the checkpoint whose record is read (default: newest)")
    parser.add_argument("--data", default=None, type=dataset_prefix,
                        help="dataset prefix without .bin/.idx (for sharded pre-shuffled data, "
                             "the .idx prefix; the shards are found beside it); 'demo' = the bundled "
                             "demo training data")
    parser.add_argument("--order", choices=("preshuffled", "neox"), default=None,
                        help="preshuffled (default): row j is item j of a pre-shuffled dataset; neox: "
                             "GPT-NeoX's index maps over a raw document dataset")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="global batch, rows per step (default without --checkpoints: 1024)")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="tokens per row, each row holds seq_len+1 (default without --checkpoints: 2048)")
    parser.add_argument("--seed", type=seed, default=None,
                        help="GPT-NeoX order seed (default without --checkpoints: 1234)")
    parser.add_argument("--train-iters", type=positive_int, default=None,
                        help="training steps the GPT-NeoX maps were built for (default without "
                             "--checkpoints: 143000)")


FLAG_NAMES = {"data": "--data", "order": "--order", "seq_len": "--seq-len", "global_batch": "--batch-size",
              "seed": "--seed", "train_iters": "--train-iters", "transform": "--transform",
              "transform_params": "--transform-param", "transform_steps": "--transform-steps"}


def run_data_from_args(args: argparse.Namespace, **transform):
    """The ``RunData`` of the data flags of ``batches`` / ``count``: the run's record with
    ``--checkpoints`` (every data flag given beside it, ``transform`` settings included, must
    agree with the record), else the flags with Pythia's values for the unset ones."""
    from pythia_jax.checkpoint import resolve_run_data
    from pythia_jax.data.run_data import PYTHIA_DEFAULTS, RunDataError

    if args.step is not None and args.checkpoints is None:
        raise RunDataError(f"--step {args.step} picks the checkpoint whose run record is read; it needs "
                           "--checkpoints (without it the data flags decide the rows)")
    return resolve_run_data(args.checkpoints, args.step, what=FLAG_NAMES, data=args.data, order=args.order,
                            seq_len=args.seq_len, global_batch=args.batch_size, seed=args.seed,
                            train_iters=args.train_iters, **transform,
                            defaults=None if args.checkpoints else PYTHIA_DEFAULTS)


def _transform_params(items) -> dict:
    """``--transform-param KEY=VALUE`` (repeatable) as a dict (values JSON when they parse)."""
    from pythia_jax.config import ConfigError

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--transform-param {item!r}: expected KEY=VALUE")
        params[key] = _param_value(value)
    return params


def _transform_steps(text: str | None) -> list[int] | None:
    """``--transform-steps A,B`` as [A, B] (None when not given)."""
    from pythia_jax.config import ConfigError

    if text is None:
        return None
    try:
        steps = [int(x) for x in text.split(",")]
    except ValueError:
        steps = []
    if len(steps) != 2:
        raise ConfigError(f"--transform-steps {text!r}: expected A,B (two step numbers)")
    return steps


def _report_changes(run_data, original, rows, first: int, batch: int) -> None:
    """A line per step the run's transform applies to: tokens and rows it changed."""
    from pythia_jax.data.transforms import TransformSpec

    spec = TransformSpec.from_dict(run_data.transform)
    for step in range(first // batch, first // batch + len(rows) // batch):
        if not spec.applies_to(step):
            continue
        a = step * batch - first
        diff = original[a:a + batch] != rows[a:a + batch]
        print(f"step {step}: {spec.name} changed {int(diff.sum())} tokens in {int(diff.any(axis=1).sum())} "
              f"of {batch} rows")


def _param_value(text: str):
    import json
    try:
        return json.loads(text)
    except ValueError:
        return text


def _marked(old, new, decode) -> str:
    """The text of ``new`` with every changed span shown as ``[old→new]``."""
    import numpy as np

    changed = np.flatnonzero(old != new)
    if len(changed) == 0:
        return decode(new)
    parts, pos, i = [], 0, 0
    while i < len(changed):
        j = i
        while j + 1 < len(changed) and changed[j + 1] == changed[j] + 1:
            j += 1
        a, b = int(changed[i]), int(changed[j]) + 1
        o, n = decode(old[a:b]), decode(new[a:b])
        lead = n[: len(n) - len(n.lstrip())]
        parts += [decode(new[pos:a]), f"{lead}[{o.strip()}→{n.strip()}]"]
        pos, i = b, j + 1
    parts.append(decode(new[pos:]))
    return "".join(parts)
