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
pythia-jax lm-eval: the LM evaluation harness's command line (lm_eval) with this project's model
registered as --model pythia_jax (the harness's own models, e.g. --model hf, work as with
lm_eval). Every argument goes to lm_eval unchanged.

--model_args of pythia_jax (comma-separated key=value):
  path=DIR          an HF directory, a folder of HF step<N>/ revisions, or a pythia-jax checkpoint
                    directory (required)
  step=N            which revision / checkpoint step (default: the newest)
  batch_size=N      sequences per forward pass (default: 16; lm_eval's --batch_size sets it too)
  max_length=N      context window (default: the model's max_position_embeddings)
  max_gen_toks=N    generation limit for generate_until tasks (default: 256)

examples:
  pythia-jax lm-eval --model pythia_jax --model_args path=runs/demo/hf --tasks piqa --batch_size 16
      (needs the dataset hub to download piqa)
  pythia-jax lm-eval --model pythia_jax --model_args path=runs/demo/hf \\
      --include_path configs/lm_eval --tasks piqa_local --batch_size 16
      (offline: a task YAML with dataset_path: json reads a local JSONL file; see
       configs/lm_eval/piqa_local.yaml)

lm_eval's own options follow.
"""


def run(args: argparse.Namespace) -> int:
    from pythia_jax.errors import PythiaJaxError

    try:
        from lm_eval.__main__ import cli_evaluate

        import pythia_jax.eval.lm_eval_adapter  # noqa: F401  (registers --model pythia_jax)
    except ModuleNotFoundError as e:
        raise PythiaJaxError(f"lm-eval is not installed ({e.name}): pip install 'pythia-jax[lm_eval]'") from None
    if any(a in ("-h", "--help") for a in args.passthrough_args):
        print(DESCRIPTION)
    saved_argv, sys.argv = sys.argv, ["lm_eval", *args.passthrough_args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved_argv
    return 0
