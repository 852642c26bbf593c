"""Training: the Pythia recipe on a sharded mesh.

Modules (each documents its API):
- ``config``: ``TrainConfig`` / ``OptimizerConfig`` / ``MeshConfig`` / ``DataConfig`` /
  ``DistributedConfig`` dataclasses, gin registration, ``build_train_config``, ``pythia_recipe``.
- ``optimizer``: the GPT-NeoX LR schedule, the Pythia AdamW chain, Adam-moment access for
  converters, DeepSpeed-style dynamic loss scaling.
- ``step``: ``TrainState``, the pure ``train_step`` / ``eval_step``, AOT compilation with shardings.
- ``builder``: mesh + shardings + compiled steps + initial state for a ``TrainConfig``.
- ``metrics``: FLOPs per token, MFU, throughput, console / TensorBoard writers, ``metrics.jsonl``.
- ``loop``: ``train(cfg)``: restore or initialise → the step loop with its hooks → final save,
  HF export (``export_hf``).
- ``start``: where a run starts: ``restore_or_init`` (resume from the newest valid checkpoint, or
  a random init / a branch from ``TrainConfig.init_from`` at ``start_step``).
- ``hooks``: ``RunState``, ``run_steps`` and the per-step hooks (metrics one step late,
  failed-save check, evaluation, checkpoint schedule, preemption, row-transform statistics).
- ``resume``: the run record in every checkpoint (``run_config``) and the resume check
  (``check_resume``).
- ``batches``: the training iterator, held-out batches and ``evaluate`` for a ``TrainConfig``.
- ``distributed``: ``jax.distributed.initialize`` for multi-process runs.
- ``paths``: where a run's local files go (``local_output_dir``).
- ``run_lock``: the lock on a run directory (one ``train`` at a time).
- ``preemption``: clean stop on SIGTERM.
- ``continuation``: optimizer states for training on from converted checkpoints (GPT-NeoX ZeRO
  moments, or a fresh state with the LR schedule at the checkpoint's step).
"""
