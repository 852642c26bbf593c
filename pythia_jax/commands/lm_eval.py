"""``pythia-jax lm-eval ...``: the LM evaluation harness's command line with ``--model pythia_jax``.

Every argument is passed to ``lm_eval`` unchanged; importing the adapter first registers the
``pythia_jax`` model (the harness has no plugin hook for models, so the bare ``lm_eval`` command
cannot see it). Needs the ``lm_eval`` extra.
"""

from __future__ import annotations

import argparse
import sys

HELP = "run the LM evaluation harness (lm_eval) with the pythia_jax model registered"
DESCRIPTION = """\
Run the LM evaluation harness with this project's models: every argument goes to lm_eval.

example:
  pythia-jax lm-eval --model pythia_jax --model_args path=runs/demo/hf --tasks piqa --batch_size 16
  (path: an HF directory, HF step<N>/ folders with step=N, or a checkpoint directory of this project)
"""


def run(args: argparse.Namespace) -> int:
    from pythia_jax.errors import PythiaJaxError

    try:
        import pythia_jax.eval.lm_eval_adapter  # noqa: F401  (registers --model pythia_jax)
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError as e:
        raise PythiaJaxError(f"lm-eval is not installed ({e.name}): pip install 'pythia-jax[lm_eval]'") from None
    saved_argv, sys.argv = sys.argv, ["lm_eval", *args.passthrough_args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved_argv
    return 0
