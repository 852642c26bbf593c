"""``pythia-jax train``: train or resume a GPT-NeoX model as configured by gin files."""

from __future__ import annotations

import argparse

HELP = "train (or resume) a Pythia model: gin-configured, sharded, checkpointed on Pythia's schedule"
DESCRIPTION = """\
Train (or resume) a GPT-NeoX / Pythia model.

  pythia-jax train --gin_file=configs/demo.gin                       # the built-in CPU demo
  pythia-jax train --gin_file=configs/train/pythia-160m.gin \\
      --gin.DataConfig.prefix="'/data/pile_text_document'" --gin.TrainConfig.output_dir="'runs/160m'"
  pythia-jax train --gin_file=configs/demo.gin --gin.TrainConfig.num_steps=20   # shorter demo

Bindings: TrainConfig.*, OptimizerConfig.*, MeshConfig.*, DataConfig.*, DistributedConfig.*,
ModelConfig.* (see pythia_jax/train/config.py). Re-running the same command resumes from the
newest valid checkpoint in <output_dir>/checkpoints.
"""
USES_GIN = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pythia_jax.commands.argtypes import positive_int

    parser.add_argument("--max_steps", type=positive_int, default=None,
                        help="stop after this many steps of this invocation (the run can be resumed)")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved configuration and exit without training")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from pythia_jax import gin_setup
    from pythia_jax.train.config import build_train_config

    if not args.gin_files:
        from pythia_jax.config import ConfigError

        raise ConfigError("no gin file given; try --gin_file=configs/demo.gin")
    gin_setup.parse(args.gin_files, args.gin_bindings)
    cfg = build_train_config()
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        return 0

    from pythia_jax.train.loop import train

    result = train(cfg, max_steps=args.max_steps)
    import jax

    if jax.process_index() == 0:
        _report(cfg, result)
    return 0


def _report(cfg, result) -> None:
    import os

    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    if result.stopped or result.final_step < cfg.num_steps:
        why = "a stop signal" if result.stopped else "--max_steps"
        print(f"stopped at step {result.final_step} of {cfg.num_steps} ({why}; checkpoint saved in {ckpt_dir}); "
              "run the same command to continue")
        return
    print(f"done: step {result.final_step} of {cfg.num_steps}; checkpoints in {ckpt_dir}")
    if result.losses:
        first, last = min(result.losses), max(result.losses)
        print(f"train loss: step {first} {result.losses[first]:.4f} -> step {last} {result.losses[last]:.4f}")
    if result.eval_losses:
        last = max(result.eval_losses)
        print(f"held-out loss at step {last}: {result.eval_losses[last]:.4f}")
    where = result.hf_dir or ckpt_dir
    print("\nLoad the trained model:")
    if result.hf_dir:
        print("  from transformers import GPTNeoXForCausalLM, AutoTokenizer")
        print(f"  model = GPTNeoXForCausalLM.from_pretrained({result.hf_dir!r})")
        print(f"  tokenizer = AutoTokenizer.from_pretrained({result.hf_dir!r})")
    print("  import pythia_jax")
    print(f"  model = pythia_jax.load({where!r})")
    if result.hf_dir:
        print(f"  # or any checkpoint step: pythia_jax.load({ckpt_dir!r}, step=N)")
