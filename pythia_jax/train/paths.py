"""Where a run's local files go, which folders may be a run's ``output_dir``, and undoing what a
failed start created (no JAX import: ``train.config`` and ``train.loop`` both use it)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pythia_jax.errors import ConfigError
from pythia_jax.io_utils import describe_path, is_url, path_kind
from pythia_jax.io_utils.outputs import path_relation

logger = logging.getLogger(__name__)

# What a run writes in its output_dir (train/loop.py); an export may go to a folder beside them.
RUN_ENTRIES = ("checkpoints", "tensorboard", "index_maps", "metrics.jsonl", "train.lock")


def local_output_dir(output_dir: str) -> str:
    """Where logs (metrics.jsonl, TensorBoard) and index-map caches go.

    ``output_dir`` itself when it is a local path; for a URL (``gs://bucket/run``) a local folder
    ``runs/bucket_run``, since appending JSON lines and building memory-mapped caches need a local
    file system (checkpoints still go to the URL).
    """
    if not is_url(output_dir):
        return output_dir
    return os.path.join("runs", output_dir.split("://", 1)[1].strip("/").replace("/", "_"))


def check_run_dir(output_dir: str) -> None:
    """Refuse (``ConfigError``, one line) a local ``output_dir`` that is neither new, nor an empty
    folder, nor a training run's folder (``RUN_ENTRIES``): e.g. an HF model directory (a run's own
    export), a checkpoint root, a dataset, the working or home folder, any other folder that has
    files, or a file. A run's checkpoints, metrics and logs would be mixed into it."""
    if is_url(output_dir):
        return
    kind = path_kind(output_dir)
    if kind in (None, "empty", "run"):
        return
    path = Path(os.path.expanduser(output_dir))
    run_like = path.is_dir() and all(e.name in RUN_ENTRIES for e in path.iterdir() if not e.name.startswith("."))
    if kind == "other" and run_like:  # e.g. only index_maps/ or train.lock of an earlier start
        return
    raise ConfigError(
        f"TrainConfig.output_dir {output_dir} is {describe_path(output_dir)}, not a training run's folder: "
        f"a run writes its checkpoints/, metrics.jsonl and tensorboard/ there; choose a new folder (or "
        "an existing run's output_dir to resume it)")


class StartFootprint:
    """What a start of ``train`` creates in its local run folder, so that a start that fails
    (before its first step) leaves the folder as it found it: a new folder is removed (and the new
    parent folders left empty), an existing one loses only the entries that were not there.

    Take it before anything is written; ``keep()`` once the start has succeeded; ``undo()``
    otherwise."""

    def __init__(self, folder: str):
        self.folder = Path(os.path.expanduser(folder)).absolute()
        self.existed = self.folder.exists() or self.folder.is_symlink()
        self.before = {e.name for e in self.folder.iterdir()} if self.folder.is_dir() else set()
        top = self.folder
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        self.top = None if self.existed else top  # the outermost folder this start creates
        self.kept = False

    def keep(self) -> None:
        self.kept = True

    def undo(self) -> None:
        """Remove what the failed start created (logged); nothing once ``keep()`` was called."""
        if self.kept:
            return
        if not self.existed:
            if not self.folder.exists():
                return
            shutil.rmtree(self.folder, ignore_errors=True)
            parent = self.folder.parent
            while self.top is not None and self.top in (parent, *parent.parents):
                try:
                    parent.rmdir()  # only while empty: a folder someone else wrote to stays
                except OSError:
                    break
                parent = parent.parent
            logger.info("the start failed: removed %s, which it had created", self.folder)
            return
        try:
            new = sorted({e.name for e in self.folder.iterdir()} - self.before)
        except OSError:
            return
        for name in new:
            path = self.folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    path.unlink()
                except OSError:
                    pass
        if new:
            logger.info("the start failed: removed %s from %s, which it had created", ", ".join(new), self.folder)


def export_record(cfg) -> dict:
    """What a run's HF export records in its ``config.json`` (``pythia_jax_export``): the run it was
    written from (``output_dir``, absolute) and the step."""
    out = cfg.output_dir if is_url(cfg.output_dir) else os.path.abspath(os.path.expanduser(cfg.output_dir))
    return {"run": out, "step": int(cfg.num_steps)}


def check_export_dir(cfg) -> None:
    """Before a run: ``TrainConfig.export_hf`` may receive the final export. An existing HF
    directory there is replaced only when an earlier export of this same run wrote it (its
    ``config.json`` records the run, ``export_record``; an export without a record, from before
    runs recorded it, when it lies inside the run's own ``output_dir``); an HF directory of
    anything else (a Hub revision, another run's export) or another kind of folder is refused in
    one line (``ConfigError``), since the export would replace it without a word. Local paths
    only; process 0's files (``loop.train`` tells the other processes)."""
    from pythia_jax.convert.hf import export_source, is_hf_dir

    export = cfg.export_hf_dir
    if not export or is_url(export):
        return
    found = path_kind(export)
    if found not in (None, "empty", "hf"):  # a run, a checkpoint, the home folder, any other folder or file
        raise ConfigError(f"TrainConfig.export_hf {export} is {describe_path(export)}, not an HF directory the "
                          "export may replace: choose another TrainConfig.export_hf")
    if is_hf_dir(export):
        rec = export_source(export) or {}
        ours = export_record(cfg)["run"]
        if rec.get("run"):  # the run moved or reached by a symlink: still ours
            same = path_relation(rec["run"], ours) == "is"
        else:  # written before exports recorded their run: ours only inside our own output_dir
            same = not is_url(ours) and path_relation(export, ours) in ("is", "is inside")
        if not same:
            wrote = f"the export of run {rec['run']}" if rec.get("run") else "an HF model this run did not export"
            raise ConfigError(f"TrainConfig.export_hf {export} holds {wrote}; the final export would replace it: "
                              "choose another TrainConfig.export_hf (or remove that folder)")

