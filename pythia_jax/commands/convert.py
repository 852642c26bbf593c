"""``pythia-jax convert``: move weights between HF directories, this project's Orbax checkpoints
and GPT-NeoX DeepSpeed checkpoints.

Directions::

    hf-to-jax    HF directory          -> checkpoint dir (params; --with-optimizer: full train state)
    jax-to-hf    checkpoint dir        -> HF directory (--step N, or --all-steps: OUT/step0, OUT/step1000 …)
    neox-to-jax  NeoX global_stepN/    -> checkpoint dir (+ ZeRO master weights, Adam moments, step)
    jax-to-neox  checkpoint dir        -> NeoX pipeline checkpoint (TP 1) + yml

Every output is written to a temporary sibling and renamed when complete; an existing output is
refused unless --overwrite, which replaces only an output of the same kind (``io_utils``); an
output that is, contains or lies inside the source is always refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import re

logger = logging.getLogger(__name__)

HELP = "convert weights: hf-to-jax, jax-to-hf, neox-to-jax, jax-to-neox"
DESCRIPTION = """\
Move weights between Hugging Face directories, pythia-jax checkpoints and GPT-NeoX checkpoints.

  hf-to-jax    HF directory        -> pythia-jax checkpoint (params; --with-optimizer: train state)
  jax-to-hf    pythia-jax ckpt     -> HF directory (--step N, or --all-steps: OUT/step0, OUT/step1000, ...)
  neox-to-jax  NeoX global_stepN/  -> pythia-jax checkpoint (+ ZeRO fp32 master weights, Adam moments, step)
  jax-to-neox  pythia-jax ckpt     -> GPT-NeoX pipeline checkpoint (TP 1) + yml

A pythia-jax checkpoint source may be the checkpoint root, one step folder in it, or a training
run's folder (its checkpoints/ are read).

Outputs are written to a temporary sibling folder and renamed when complete; an existing
output is refused unless --overwrite, and --overwrite replaces only a folder of the same kind
(an HF directory, a pythia-jax checkpoint, a GPT-NeoX checkpoint), never a run directory or
any other folder. The output may not be, contain or lie inside the source.

examples:
  pythia-jax convert hf-to-jax ./pythia-160m/step143000 ckpt/160m
  pythia-jax convert jax-to-hf runs/demo --all-steps exported/ --dtype float16
  pythia-jax convert neox-to-jax /neox/checkpoints/global_step10000 ckpt/resumed
"""
DIRECTIONS = ("hf-to-jax", "jax-to-hf", "neox-to-jax", "jax-to-neox")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("direction", choices=DIRECTIONS, help="what to convert into what")
    parser.add_argument("source", help="input directory")
    parser.add_argument("output", help="output directory (root folder for --all-steps)")
    from pythia_jax.commands.argtypes import nonneg_int

    parser.add_argument("--step", type=nonneg_int, default=None,
                        help="hf-to-jax: step to store the weights at (default: N of a 'stepN' source "
                             "folder, else 0); of a folder of HF revisions step<N>/, the revision to "
                             "convert; jax-to-*: checkpoint step to export (default: newest); "
                             "neox-to-jax: which global_stepN of a NeoX run folder")
    parser.add_argument("--all-steps", action="store_true",
                        help="jax-to-hf: export every saved step to OUTPUT/step<N>/ (Hub revision names)")
    parser.add_argument("--dtype", default=None,
                        help="weights dtype written. hf-to-jax: auto (default: each tensor as stored, "
                             "lossless, e.g. float16 for the Pythia releases), float32, bfloat16 or "
                             "float16; every reader casts a checkpoint to the model's param_dtype "
                             "(float32) on load. jax-to-hf: float16 (default, like the releases), "
                             "bfloat16 or float32. jax-to-neox: float32 (default), bfloat16 or float16")
    parser.add_argument("--shard-size", default=None,
                        help="jax-to-hf: max safetensors shard size (default 2GB)")
    parser.add_argument("--with-optimizer", action="store_true",
                        help="hf-to-jax / neox-to-jax without ZeRO shards: also store a fresh optimizer "
                             "state (LR schedule at --step) so `pythia-jax train` can continue")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="neox-to-jax: ignore ZeRO optimizer shards (store module weights only)")
    parser.add_argument("--neox-config", action="append", default=None, metavar="YML",
                        help="neox-to-jax: GPT-NeoX yml file(s) when the checkpoint has no configs/ folder")
    parser.add_argument("--hidden-act", default=None,
                        help="neox-to-jax: override the GELU flavour (gelu = exact erf, gelu_new = tanh; "
                             "default from the yml: bias-gelu-fusion means tanh)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# Which direction each direction-specific flag applies to (the others apply to all four). A flag
# given for another direction is refused before any work, naming it and its directions.
FLAG_DIRECTIONS: dict[str, tuple[str, ...]] = {
    "--all-steps": ("jax-to-hf",),
    "--dtype": ("hf-to-jax", "jax-to-hf", "jax-to-neox"),
    "--shard-size": ("jax-to-hf",),
    "--with-optimizer": ("hf-to-jax", "neox-to-jax"),
    "--no-optimizer": ("neox-to-jax",),
    "--neox-config": ("neox-to-jax",),
    "--hidden-act": ("neox-to-jax",),
}
# why a flag does not apply, where that helps more than the list of directions
_NOT_APPLYING = {
    ("--dtype", "neox-to-jax"): "it stores the module weights (or the ZeRO master weights) in float32",
    ("--hidden-act", "hf-to-jax"): "the activation is config.json's hidden_act",
}
DEFAULT_SHARD_SIZE = "2GB"


def _given(args: argparse.Namespace, flag: str) -> bool:
    value = getattr(args, flag[2:].replace("-", "_"))
    return value is not None and value is not False


def check_flags(args: argparse.Namespace) -> None:
    """Refuse a flag that does not apply to ``args.direction`` and parse every value, before any
    input is read (``ConfigError``, one line)."""
    from pythia_jax.errors import ConfigError

    for flag, directions in FLAG_DIRECTIONS.items():
        if _given(args, flag) and args.direction not in directions:
            why = _NOT_APPLYING.get((flag, args.direction))
            raise ConfigError(f"{flag} does not apply to {args.direction}"
                              + (f" ({why})" if why else "")
                              + f"; it applies to {', '.join(directions)}")
    if args.all_steps and args.step is not None:
        raise ConfigError("use either --step or --all-steps")
    _check_dtype(args)
    if args.shard_size is not None:
        from pythia_jax.io_utils import parse_size
        try:
            parse_size(args.shard_size)
        except Exception as e:  # noqa: BLE001 - one message for the CLI
            raise ConfigError(f"--shard-size: {e}") from None
    if args.hidden_act is not None:
        from pythia_jax.hf_config import EXACT_GELU_NAMES, TANH_GELU_NAMES
        if args.hidden_act not in EXACT_GELU_NAMES + TANH_GELU_NAMES:
            raise ConfigError(f"--hidden-act {args.hidden_act!r} is not a GELU flavour this model runs; "
                              f"use one of {', '.join(EXACT_GELU_NAMES + TANH_GELU_NAMES)}")


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    from pythia_jax.io_utils import check_inputs
    check_inputs(args.output, [args.source])
    progress = not args.no_progress
    handler = {"hf-to-jax": _hf_to_jax, "jax-to-hf": _jax_to_hf,
               "neox-to-jax": _neox_to_jax, "jax-to-neox": _jax_to_neox}[args.direction]
    handler(args, progress)
    return 0


def _check_dtype(args: argparse.Namespace) -> None:
    """``--dtype``: a known name, ``auto`` only for hf-to-jax (neox-to-jax: ``check_flags``)."""
    from pythia_jax.convert.dtypes import canonical_dtype, is_auto
    from pythia_jax.errors import ConfigError

    if args.dtype is None:
        return
    if is_auto(args.dtype):
        if args.direction != "hf-to-jax":
            raise ConfigError(f"--dtype auto only applies to hf-to-jax; {args.direction} writes one dtype: "
                              "pass float16, bfloat16 or float32")
        return
    try:
        canonical_dtype(args.dtype)
    except Exception:  # noqa: BLE001 - one message for the CLI
        raise ConfigError(f"--dtype {args.dtype!r} is not a dtype this converter writes; use "
                          + ("auto, " if args.direction == "hf-to-jax" else "")
                          + "float16, bfloat16 or float32") from None


def dtype_summary(params, save_dtype=None) -> str:
    """``"float16"``, or ``"float16 (30 arrays), float32 (2 arrays)"`` for a mixed tree; as
    stored by a save with ``save_dtype`` (``convert.dtypes.defer_widening``)."""
    import collections

    import jax

    from pythia_jax.convert.dtypes import saved_dtype

    counts = collections.Counter(saved_dtype(x.dtype, save_dtype).name for x in jax.tree.leaves(params)
                                 if hasattr(x, "dtype"))
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{name} ({n} arrays)" for name, n in counts.most_common())


def _hf_source(source: str, step: int | None) -> tuple[str, int]:
    """(the HF directory to read, the step to store it at) for hf-to-jax: ``source`` itself (step:
    ``--step``, else N of a ``stepN`` folder name, else 0), or in a folder of HF revisions
    (``step<N>/``, as the Pythia suite publishes them) the revision ``--step`` names."""
    from pythia_jax.checkpoint.failures import step_list
    from pythia_jax.convert.sources import revision_folder_steps
    from pythia_jax.errors import ConfigError

    revisions = revision_folder_steps(source) if os.path.isdir(source) else []
    if revisions:
        if step is None or step not in revisions:
            asked = "no --step" if step is None else f"no revision step{step}"
            raise ConfigError(f"{source} is a folder of HF revisions ({asked}): pass --step N for its "
                              f"step<N>/ folder; available: {step_list(revisions)}")
        return os.path.join(source, f"step{step}"), step
    if step is None:
        m = re.fullmatch(r"step(\d+)", os.path.basename(os.path.normpath(source)))
        step = int(m.group(1)) if m else 0
    return source, step


def _hf_to_jax(args: argparse.Namespace, progress: bool) -> None:
    from pythia_jax.convert.dtypes import defer_widening
    from pythia_jax.convert.hf import read_hf_dir

    source, step = _hf_source(args.source, args.step)
    _check_output(args, "checkpoint")
    # read as stored; a float32 checkpoint of a half-precision release is widened by the save
    config, params = read_hf_dir(source, progress=progress, dtype="auto")
    params, save_dtype = defer_widening(params, args.dtype, source)
    stored = dtype_summary(params, save_dtype)
    opt_state = None
    if args.with_optimizer:
        from pythia_jax.train.continuation import fresh_opt_state
        opt_state = fresh_opt_state(params, schedule_count=step)
    write_checkpoint(args.output, step, config, params, opt_state,
                     {"source": "hf", "hf_dir": os.path.abspath(source)}, args.overwrite, progress,
                     dtype=save_dtype)
    print(f"wrote {args.output} (step {step}, params in {stored}"
          f"{', with fresh float32 optimizer state' if opt_state else ''})")


def _neox_to_jax(args: argparse.Namespace, progress: bool) -> None:
    from pythia_jax.convert.neox import read_neox_checkpoint
    from pythia_jax.train.continuation import fresh_opt_state, neox_train_state

    _check_output(args, "checkpoint")
    config, params, ckpt = read_neox_checkpoint(args.source, step=args.step, config_files=args.neox_config,
                                                hidden_act=args.hidden_act, progress=progress)
    metadata = {"source": "gpt-neox", "neox_checkpoint": ckpt.directory}
    opt_state = None
    step = _neox_step(ckpt, args.step)
    if ckpt.optim_files and not args.no_optimizer:
        del params
        params, opt_state, step, metadata = neox_train_state(ckpt, config, progress=progress)
        what = f"fp32 master weights and Adam state ({metadata['adam_steps']} Adam steps)"
        copies = metadata["optimizer"].get("row_parallel_bias_copies", 1)
        if copies > 1:
            what += (f"; continue with --gin.OptimizerConfig.row_parallel_bias_copies={copies} "
                     f"(tensor parallelism {copies} with the parallel residual: the configs/train "
                     "recipes of 6.9b and 12b set it)")
    else:
        if args.with_optimizer:
            opt_state = fresh_opt_state(params, schedule_count=step)
        what = "module weights" + (" and a fresh optimizer state" if opt_state is not None else "")
    write_checkpoint(args.output, step, config, params, opt_state, metadata, args.overwrite, progress)
    print(f"wrote {args.output} (step {step}: {what})")


def _neox_step(ckpt, asked: int | None) -> int:
    """The step of a GPT-NeoX step folder: the iteration its ``mp_rank_00_model_states.pt`` records,
    else N of its ``global_stepN`` name, else ``--step``, else 0. A ``--step`` that disagrees with
    the recorded iteration is refused (``CheckpointError``): the weights are that iteration's, and
    the LR schedule of a ``--with-optimizer`` state would start elsewhere; a folder name that
    disagrees (a renamed folder) is warned about."""
    from pythia_jax.convert.neox.zero import saved_iteration
    from pythia_jax.errors import CheckpointError

    saved = saved_iteration(ckpt)
    if saved is not None and asked is not None and asked != saved:
        raise CheckpointError(f"{ckpt.directory} records iteration {saved}, but --step {asked} was asked for: pass "
                              f"--step {saved} (or none), or the folder of step {asked}")
    if saved is not None and ckpt.step is not None and ckpt.step != saved:
        logger.warning("%s records iteration %d, not the %d of its name: converting it as step %d", ckpt.directory,
                       saved, ckpt.step, saved)
    for step in (saved, ckpt.step, asked):
        if step is not None:
            return int(step)
    return 0


def _jax_to_hf(args: argparse.Namespace, progress: bool) -> None:
    from pythia_jax.checkpoint import STORED, TrainCheckpointer, load_params, resolve_checkpoint_step
    from pythia_jax.convert.dtypes import canonical_dtype
    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.errors import CheckpointError
    from pythia_jax.io_utils import check_output_dir

    dtype = args.dtype or "float16"
    shard_size = args.shard_size or DEFAULT_SHARD_SIZE
    root, step = resolve_checkpoint_step(args.source, args.step)
    inputs = [args.source, os.fspath(root)]
    if not args.all_steps:
        check_output_dir(args.output, args.overwrite, kind="hf", inputs=inputs)
        _status(progress, f"reading checkpoint {args.source}")
        config, params, step, why = _load_step(root, step)
        logger.info("%s step %d is stored in %s; writing %s", root, step, dtype_summary(params), dtype)
        # the step recorded, as --all-steps does: eval, generate and a branch read it as step N
        source = {"checkpoint": os.path.abspath(os.fspath(root)), "step": int(step), "dtype": canonical_dtype(dtype)}
        write_hf_dir(config, params, args.output, dtype=dtype, shard_size=shard_size,
                     overwrite=args.overwrite, progress=progress, source=source)
        print(f"wrote {args.output} (step {step}, {dtype}{why})")
        return
    # the root of the step folders: new, empty or holding only step<N>/ folders
    check_output_dir(args.output, True, kind="steps", inputs=inputs)
    with TrainCheckpointer(root, save_steps=(), async_save=False) as ckpt:
        steps = ckpt.all_steps()
    if not steps:
        raise CheckpointError(f"{root} holds no checkpoint steps")
    from pythia_jax.convert.hf import export_source
    from pythia_jax.eval.loading import weights_fingerprint

    targets = {s: os.path.join(args.output, f"step{s}") for s in steps}
    # each step folder records what it was written from: a rerun after an interruption skips the
    # folders already written from the same weights with the same settings
    sources = {s: {"checkpoint": os.path.abspath(os.fspath(root)), "step": s,
                   "weights": weights_fingerprint(root, s), "dtype": canonical_dtype(dtype),
                   "shard_size": str(shard_size)} for s in steps}
    done = [s for s in steps if not args.overwrite and export_source(targets[s]) == sources[s]]
    for s in steps:  # refuse before writing anything
        if s not in done:
            check_output_dir(targets[s], args.overwrite, kind="hf")
    if done and len(done) == len(steps):
        logger.info("%s: every step folder (%d) was already written from these weights with these settings; "
                    "nothing to do", args.output, len(steps))
    elif done:
        logger.warning("%s: %d of %d step folders were already written from these weights with these "
                       "settings (an interrupted run); writing the other %d", args.output, len(done),
                       len(steps), len(steps) - len(done))
    from tqdm.auto import tqdm
    for s in tqdm([s for s in steps if s not in done], desc="steps", unit="step", disable=not progress):
        config, params = load_params(root, step=s, host=True, dtype=STORED)
        write_hf_dir(config, params, targets[s], dtype=dtype, shard_size=shard_size,
                     overwrite=args.overwrite, progress=False, source=sources[s])
        del params
    print(f"wrote {len(steps) - len(done)} step folders under {args.output} (steps {steps[0]}..{steps[-1]}, "
          f"{dtype}{f'; {len(done)} already there' if done else ''})")


def _jax_to_neox(args: argparse.Namespace, progress: bool) -> None:
    from pythia_jax.checkpoint import resolve_checkpoint_step
    from pythia_jax.convert.neox import write_neox_checkpoint
    from pythia_jax.io_utils import check_output_dir

    root, step = resolve_checkpoint_step(args.source, args.step)
    check_output_dir(args.output, args.overwrite, kind="neox", inputs=[args.source, os.fspath(root)])
    _say_replaced_steps(args.output, "neox")
    _status(progress, f"reading checkpoint {root}")
    config, params, step, why = _load_step(root, step)
    dtype = args.dtype or "float32"
    out = write_neox_checkpoint(config, params, args.output, step=step or 0, dtype=dtype,
                                overwrite=args.overwrite, progress=progress)
    print(f"wrote {out} (step {step}, {dtype}{why})")


def _load_step(root, step: int | None):
    """``(config, host params, step, note)``: ``step``, or the newest step that reads and verifies.
    The params keep their stored dtype: the writers cast tensor by tensor to the output dtype.

    Without a step each newer unusable step (incomplete, or failing its checksums) is skipped
    with a logged warning, and ``note`` says which and why (for the closing line).
    """
    import warnings

    from pythia_jax.checkpoint import STORED, CheckpointIntegrityError, TrainCheckpointer, load_params, step_problem
    from pythia_jax.errors import CheckpointError

    if step is not None:
        config, params = load_params(root, step=step, host=True, dtype=STORED)
        return config, params, step, ""
    with TrainCheckpointer(root, save_steps=(), async_save=False) as ckpt:
        steps = ckpt.all_steps()
    if not steps:
        raise CheckpointError(f"{root} holds no checkpoint steps")
    skipped = []
    for candidate in reversed(steps):
        problem = step_problem(root, candidate)
        if problem is None:
            try:
                # the checkpoint layer's own fallback notes are replaced by the one line below
                checkpoint_log = logging.getLogger("pythia_jax.checkpoint")
                level = checkpoint_log.level
                checkpoint_log.setLevel(logging.ERROR)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        config, params = load_params(root, step=candidate, host=True, dtype=STORED)
                finally:
                    checkpoint_log.setLevel(level)
            except CheckpointIntegrityError as e:
                problem = str(e)
            else:
                note = "".join(f"; newest step {s} skipped: {p}" for s, p in skipped[:1])
                if len(skipped) > 1:
                    note += f" (and {len(skipped) - 1} more: steps {', '.join(str(s) for s, _ in skipped[1:])})"
                return config, params, candidate, note
        logger.warning("checkpoint step %d in %s is unusable (%s); falling back to an earlier step",
                       candidate, root, problem)
        skipped.append((candidate, problem))
    raise CheckpointError(f"{root}: no valid checkpoint step (" +
                          "; ".join(f"step {s}: {p}" for s, p in skipped) + ")")


def _check_output(args: argparse.Namespace, kind: str) -> None:
    from pythia_jax.io_utils import check_output_dir
    check_output_dir(args.output, args.overwrite, kind=kind, inputs=[args.source])
    _say_replaced_steps(args.output, kind)


def _say_replaced_steps(output: str, kind: str) -> None:
    """--overwrite replaces the whole output: name the steps an existing checkpoint (or GPT-NeoX
    run folder) held, which the one written step replaces (they went without a word)."""
    from pythia_jax.checkpoint.failures import step_list
    from pythia_jax.convert.neox.keys import STEP_DIR

    if not os.path.isdir(output):
        return
    pattern = re.compile(r"(\d+)") if kind == "checkpoint" else STEP_DIR
    held = sorted(int(m.group(1)) for n in os.listdir(output) if (m := pattern.fullmatch(n))
                  and os.path.isdir(os.path.join(output, n)))
    if held:
        logger.warning("--overwrite: %s holds step(s) %s, which the converted step replaces (the folder is "
                       "written anew)", output, step_list(held))


def _status(enabled: bool, message: str) -> None:
    """One line on stderr for a phase without a per-tensor progress bar (the Orbax reads / writes)."""
    if enabled:
        import sys
        print(message + " ...", file=sys.stderr, flush=True)


def _gigabytes(*trees, save_dtype=None) -> float:
    import jax

    from pythia_jax.convert.dtypes import saved_dtype
    return sum(x.size * saved_dtype(x.dtype, save_dtype).itemsize for t in trees if t is not None
               for x in jax.tree.leaves(t) if hasattr(x, "dtype")) / 1e9


def write_checkpoint(out_dir: str, step: int, config, params, opt_state, metadata, overwrite: bool,
                     progress: bool = False, dtype=None) -> None:
    """A new checkpoint directory of this project holding one step, written atomically.

    ``dtype``: the params' stored dtype where it widens theirs exactly (see
    ``convert.dtypes.defer_widening``); None: as they are."""
    from pythia_jax.checkpoint import save_params_checkpoint
    from pythia_jax.io_utils import atomic_output_dir, release_free_memory

    release_free_memory()  # the reader's freed buffers: don't hold them through the save
    _status(progress, f"writing checkpoint {out_dir} ({_gigabytes(params, opt_state, save_dtype=dtype):.2f} GB)")
    with atomic_output_dir(out_dir, overwrite, kind="checkpoint") as tmp:
        save_params_checkpoint(str(tmp), int(step), config, params, opt_state=opt_state, metadata=metadata,
                               dtype=dtype)
