"""Small file-system helpers: safe, atomic outputs; the URL test; size strings; JSONL rows with line numbers.

The facade of two modules: ``pythia_jax.io_utils.outputs`` (the output rule below) and
``pythia_jax.io_utils.files`` (``is_url``, ``parse_size``, ``iter_jsonl_objects``, ``prefetch``,
``release_free_memory``).

Output rule (every command and Python API that writes a file or folder goes through here):

* ``check_output_dir`` / ``check_output_file``: an output may never contain, or lie inside, one
  of its inputs (symlinks resolved, both directions), and is never the home folder, the working
  folder, the filesystem root or a folder above them. An existing output is refused unless
  ``overwrite``; with ``overwrite`` only an output of the *same kind* is replaced (an HF model
  directory by an HF export, a checkpoint directory of this project by a checkpoint, an indexed
  dataset by a dataset, a ``.npy`` / PNG / results table by the same) — never a training run
  directory, nor any other non-empty folder. Refusals are one line (``PythiaJaxError``) naming
  what the existing path looks like.
* ``atomic_output_dir`` / ``atomic_files`` / ``write_text_atomic`` (also ``gs://``): outputs are
  written under hidden temporary siblings
  (``.NAME.tmp-PID@HOST-XXXXXXXX``) and renamed into place when complete; outputs that belong
  together (``.bin`` + ``.idx``) are published together or, on an error, not at all (the
  previous ones are put back). The temporaries are removed on any exception; a later writer of
  the same output removes the leftovers of a killed one (``clean_stale_temps``, with a warning).
  Published files and folders get the user's umask (``0o666`` / ``0o777`` minus it).
"""

from __future__ import annotations

import os  # noqa: F401  (``io_utils.os``: the module the writers rename with)

from pythia_jax.io_utils.files import (
    _decompression_errors,
    _open_bytes,
    _ZstdReader,
    is_url,
    iter_jsonl_objects,
    parse_size,
    prefetch,
    release_free_memory,
)
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
