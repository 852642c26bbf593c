"""Evaluation across training: zero-shot tasks, perplexity, memorization, generation.

Modules (each documents its API):
- ``tasks`` + ``task_specs/*.yaml``: multiple-choice tasks as data (PIQA, ARC-Easy/Challenge,
  SciQ, WinoGrande in lm-evaluation-harness formats).
- ``tokens``: harness-style request tokenization and rolling windows.
- ``runtime``: mesh + parameter placement (the training rule table), batch sharding.
- ``scoring``: bucketed, jitted log-likelihood (``Scorer``); ``zero_shot``: acc / acc_norm ± stderr.
- ``generate``: KV-cache greedy / top-k / top-p sampling (``Generator``).
- ``perplexity``, ``memorization``: loss per token/document; 32+32-token memorization per row.
- ``loading``: checkpoints of this project or HF ``step<N>/`` revision folders.
- ``runner`` / ``plot``: many checkpoints -> one tidy table -> metric-vs-step PNG.
- ``lm_eval_adapter`` (extra ``lm_eval``), ``seqio_tasks`` (extra ``seqio``).
"""
