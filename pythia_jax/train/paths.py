"""Where a run's local files go (no JAX import: ``train.config`` and ``train.loop`` both use it)."""

from __future__ import annotations

import os

from pythia_jax.io_utils import is_url


def local_output_dir(output_dir: str) -> str:
    """Where logs (metrics.jsonl, TensorBoard) and index-map caches go.

    ``output_dir`` itself when it is a local path; for a URL (``gs://bucket/run``) a local folder
    ``runs/bucket_run``, since appending JSON lines and building memory-mapped caches need a local
    file system (checkpoints still go to the URL).
    """
    if not is_url(output_dir):
        return output_dir
    return os.path.join("runs", output_dir.split("://", 1)[1].strip("/").replace("/", "_"))
