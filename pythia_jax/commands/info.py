"""``pythia-jax info``: the Pythia presets with their shapes and parameter counts."""

from __future__ import annotations

import argparse

HELP = "list the Pythia model presets (shapes, parameter counts, learning rates)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="show one preset as its HF config.json")


def run(args: argparse.Namespace) -> int:
    import json

    from pythia_jax.config import PRESET_MAX_LR, ModelConfig, preset_names

    if args.model:
        print(json.dumps(ModelConfig.preset(args.model).to_hf_dict(), indent=2))
        return 0
    print(f"{'model':24s} {'L':>3s} {'H':>5s} {'heads':>5s} {'hd':>4s} {'vocab':>6s} "
          f"{'params':>15s} {'max lr':>8s}")
    for name in preset_names():
        c = ModelConfig.preset(name)
        lr = PRESET_MAX_LR[name.replace("-deduped", "")]
        print(f"{name:24s} {c.num_layers:3d} {c.hidden_size:5d} {c.num_heads:5d} {c.head_dim:4d} "
              f"{c.vocab_size:6d} {c.num_params():15,d} {lr:8.1e}")
    return 0
