"""Orbax checkpoints of this project: Pythia's save schedule, integrity checks, resharding restore.

Layout of a checkpoint directory (an ``orbax.checkpoint.CheckpointManager`` root)::

    <dir>/model_config.json          ModelConfig.to_dict(), written once, atomically
    <dir>/<step>/params/             the canonical params tree, Orbax PyTree (OCDBT): float32 from
                                     training; a converter may store float16 / bfloat16
                                     (``stored_dtypes``), which restores cast to the target dtype
    <dir>/<step>/opt_state/          optax state (optional)
    <dir>/<step>/data_iter/          data-iterator state: grain's per-process JSON files
                                     (``process_<i>-of-<n>.json``) or one JSON document
    <dir>/<step>/metadata/           JSON: the caller's metadata plus ``__checkpoint__``
                                     (format version, item list, per-leaf checksums); the
                                     trainer's metadata holds ``run_config`` (the run's data
                                     order, schedule and model: :func:`read_run_config`)

A step directory is written under a temporary name and renamed (local disk) or marked with
``commit_success.txt`` (``gs://``) by Orbax when complete, so an interrupted save is never seen
as a step. On top of that every step stores two 32-bit checksums per array (wrap-around sums of
the raw bit patterns, plain and position-weighted: exact under any sharding), verified on
restore. :meth:`TrainCheckpointer.restore` without a step walks back from the newest step,
warning about each incomplete or corrupt one, until one restores and verifies.

Resharding: restore targets are ``jax.ShapeDtypeStruct``s carrying a ``sharding``; each device
reads only its own slice, whatever mesh (or number of devices/processes) wrote the checkpoint.

Multi-host: every process calls every method (Orbax synchronises); ``model_config.json`` and
JSON items are written by process 0; grain iterator states are written per process.

Modules, one job each (lowest first):

- ``schedule``: which steps are saved (``CheckpointSchedule``, ``pythia_steps``).
- ``layout``: item names, errors, paths, the ``model_config.json`` sidecar, multi-host helpers.
- ``integrity``: per-array checksums, ``step_problem``, shape checks.
- ``run_config``: the trainer's record of the run in each step (``read_run_config``), and the
  run's rows from it (``read_run_data`` / ``resolve_run_data``).
- ``hostio``: the converters' bounded host I/O (Orbax handlers).
- ``items``: the Orbax arguments and metadata document of one save.
- ``restore``: restore targets, reading and verifying one step.
- ``failures``: one-line reports of failed saves.
- ``manager``: ``TrainCheckpointer``.
- ``params``: ``load_params`` / ``save_params_checkpoint`` (converters, public API).
"""

from __future__ import annotations

from pythia_jax.checkpoint.integrity import (
    _checksum_fn,
    _host_checksum,
    _leaf_paths,
    step_problem,
    stored_checksums,
    tree_checksums,
)
from pythia_jax.checkpoint.layout import (
                                          DATA_ITER,
                                          EXECUTION_FIELDS,
                                          FORMAT_VERSION,
                                          METADATA,
                                          MODEL_CONFIG_FILE,
                                          OPT_STATE,
                                          PARAMS,
                                          CheckpointIntegrityError,
                                          CheckpointSaveFailed,
                                          RunConfigMismatch,
                                          _epath,
                                          _is_primary,
                                          _sync,
                                          config_differences,
                                          is_checkpoint_dir,
                                          read_model_config,
                                          resolve_checkpoint_dir,
                                          resolve_checkpoint_step,
                                          write_model_config,
)
from pythia_jax.checkpoint.manager import TrainCheckpointer
from pythia_jax.checkpoint.params import STORED, load_params, save_params_checkpoint, stored_dtypes
from pythia_jax.checkpoint.restore import RestoredState, _item_tree_metadata
from pythia_jax.checkpoint.run_config import RUN_CONFIG_KEY, read_run_config, read_run_data, resolve_run_data

# The underscored names below are re-exported for the tests, which inspect them.
from pythia_jax.checkpoint.schedule import CheckpointSchedule, SaveSteps, pythia_steps

__all__ = [
    "CheckpointIntegrityError", "CheckpointSaveFailed", "RunConfigMismatch", "read_run_config",
    "read_run_data", "resolve_run_data",
    "CheckpointSchedule", "RestoredState", "TrainCheckpointer",
    "pythia_steps", "save_params_checkpoint", "load_params", "stored_dtypes", "STORED", "read_model_config",
    "write_model_config", "config_differences", "tree_checksums", "stored_checksums", "step_problem",
    "is_checkpoint_dir", "resolve_checkpoint_dir", "resolve_checkpoint_step",
    "RUN_CONFIG_KEY", "EXECUTION_FIELDS", "MODEL_CONFIG_FILE", "PARAMS", "OPT_STATE", "DATA_ITER",
    "METADATA", "FORMAT_VERSION", "SaveSteps",
]
