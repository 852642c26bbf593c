"""Small file-system helpers: safe, atomic outputs; the URL test; size strings; JSONL rows with line numbers.

The facade of two modules: ``pythia_jax.io_utils.outputs`` (the output rule below) and
``pythia_jax.io_utils.files`` (``is_url``, ``parse_size``, ``iter_jsonl_objects``, ``json_safe``, ``prefetch``,
``release_free_memory``).

The output rule every writer follows (no output around or inside its inputs; ``overwrite``
replaces only the same kind; atomic publication; stale temporaries) is described in
``pythia_jax.io_utils.outputs``.
"""

from __future__ import annotations

import os  # noqa: F401  (``io_utils.os``: the module the writers rename with)

from pythia_jax.io_utils.files import (
    _decompression_errors,
    _open_bytes,
    _ZstdReader,
    is_url,
    iter_jsonl_objects,
    json_safe,
    parse_size,
    prefetch,
    release_free_memory,
)
from pythia_jax.io_utils.interrupts import deferred_interrupts, raise_if_interrupted, watch_interrupts  # noqa: F401
from pythia_jax.io_utils.outputs import (
    _IDX_MAGIC,
    _NPY_MAGIC,
    _PNG_MAGIC,
    _TMP_RE,
    HF_WEIGHTS,
    KIND_NAMES,
    STALE_REMOTE_SECONDS,
    _alive,
    _chmod_published,
    _head,
    _is_table,
    _list_dir,
    _protected,
    _relation,
    _remove,
    _resolved,
    _tag,
    _umask,
    _visible,
    atomic_files,
    atomic_output_dir,
    check_inputs,
    check_output_dir,
    check_output_file,
    clean_stale_temps,
    describe_path,
    path_kind,
    publish,
    temp_sibling,
    write_text_atomic,
)
