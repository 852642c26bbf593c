"""Audit a series of checkpoints: one streaming pass over every file, a fingerprint per tensor.

A series is either a folder of Hugging Face revisions ``DIR/step<N>/`` (as the Pythia suite
publishes its 154 branches: each an HF ``GPTNeoXForCausalLM`` directory with ``config.json`` and
``model.safetensors`` / ``pytorch_model.bin``, possibly sharded with an index), or a checkpoint
directory of this project (``DIR/<step>/params``, Orbax).

Every tensor's bytes are read once, in chunks of :data:`CHUNK_BYTES`; in the same pass the
chunk is hashed (BLAKE2b, 128-bit digest of the stored bytes, so the fingerprint depends on the
stored dtype) and its float values give the sum of squares, the number of non-finite values and
the min / max. Peak memory is a few chunks for safetensors; a ``.bin`` file is memory-mapped
(PyTorch's zip format) or loaded whole (legacy pickles); an Orbax step is restored to host memory
one step at a time, in its stored dtype (one model; float16 for a ``convert hf-to-jax`` of a
release).

Findings (:class:`Finding`, ``kind``):

- ``identical_step``: two steps whose tensors are all byte-identical (e.g. Hub revisions of
  different steps serving the same weights). Steps 0 and 1 are expected to be identical (GPT-NeoX's
  ``AnnealingLR`` warmup, like this project's schedule, gives lr 0 to the first update), so that
  pair is a note;
- ``duplicate_shard``: a weight file whose tensors are byte-identical to a file of another step
  (an out-of-era shard); ``duplicate_tensor``: the same for single tensors (tensors whose values
  are all equal, such as LayerNorm scales still at 1.0 early in training, are not compared);
- ``missing_file``, ``truncated_file``, ``corrupt_file``, ``missing_tensor``, ``shape_mismatch``,
  ``incomplete_step``: a step that cannot be read as a whole model;
- ``config_mismatch``: a step whose architecture differs from the series' most common one
  (execution-only fields such as dtype are ignored);
- ``nonfinite``: NaN or infinite values;
- ``norm_jump``: a step whose parameter norm (whole model, or one layer / embedding) leaves the
  series' local trend, see :func:`norm_outliers`.

``note`` findings (unknown tensors, leftovers of interrupted saves) are reported but do not make
the audit fail.

Modules: ``readers`` (the streaming pass over safetensors / ``.bin`` / Orbax steps), ``findings``
(the checks), ``series`` (finding and auditing the steps of a series), ``report`` (the records, the
table and the JSON); this package re-exports them.
"""

from pythia_jax.analysis.audit.findings import (
    _config_mismatches,
    _duplicate_shards,
    _duplicate_tensors,
    _identical_steps,
    _norm_jumps,
    analyze,
    norm_outliers,
)
from pythia_jax.analysis.audit.readers import (
    _CODES,
    _ST_ITEMSIZE,
    _TORCH_CODES,
    _architecture,
    _audit_checkpoint_step,
    _audit_hf_step,
    _check_expected,
    _chunk_stats,
    _done,
    _flatten,
    _float_values,
    _group_of,
    _Hasher,
    _hf_weight_files,
    _pool,
    _read_header,
    _safetensors_entries,
    _stream_safetensors,
    _stream_torch_bin,
    _Truncated,
    plain_hash_seconds,
)
from pythia_jax.analysis.audit.report import (
    _LAYER,
    _STEP_DIR,
    CHUNK_BYTES,
    DIGEST_SIZE,
    ERROR_KINDS,
    AuditReport,
    Finding,
    Stats,
    StepRecord,
    TensorPrint,
    _nan_none,
    _some,
    write_report_json,
)
from pythia_jax.analysis.audit.series import audit_series, find_series

__all__ = ["AuditReport", "Finding", "StepRecord", "TensorPrint", "Stats", "audit_series", "analyze",
           "find_series", "norm_outliers", "write_report_json", "plain_hash_seconds", "ERROR_KINDS"]
