"""``python -m pythia_jax.eval.lm_eval_cli ...``: the ``lm_eval`` command line with the
``pythia_jax`` model registered (the harness has no plugin mechanism for models)."""

import pythia_jax.eval.lm_eval_adapter  # noqa: F401  (registers --model pythia_jax)
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
