"""Analyses of checkpoint series and evaluation outputs.

- :mod:`pythia_jax.analysis.audit`: fingerprints every tensor of a series of checkpoints and flags
  duplicated steps, out-of-era shards, truncated files, config disagreements, non-finite values
  and parameter-norm jumps (``pythia-jax audit``).
- :mod:`pythia_jax.analysis.memorization_stats`: statistics of per-row memorization results
  (Poisson tests over windows of rows, correlations and prediction of memorized sets between
  checkpoints; ``pythia-jax memorization-report``).
- :mod:`pythia_jax.analysis.term_frequency`: joins term counts up to each checkpoint with few-shot
  arithmetic accuracy (binned accuracy against count, the frequent-minus-rare gap;
  ``pythia-jax term-frequency``).

This subpackage reads checkpoints and results through ``pythia_jax.convert``,
``pythia_jax.checkpoint`` and ``pythia_jax.eval``; it never imports the command-line layer.
"""
