"""Output safety: what a path is, which outputs may be written, and atomic publication.

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

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Sequence

from pythia_jax.errors import PythiaJaxError
from pythia_jax.io_utils.files import is_url
from pythia_jax.io_utils.interrupts import raise_if_interrupted

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- what a path is
HF_WEIGHTS = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                        r"pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json|"
                        r"flax_model\.msgpack)$")
KIND_NAMES = {
    "hf": "an HF model directory (config.json + weights)",
    "checkpoint": "a pythia-jax checkpoint directory (model_config.json + step folders)",
    "neox": "a GPT-NeoX checkpoint (latest + global_step<N>/)",
    "steps": "a folder of step<N>/ HF directories",
    "dataset": "an indexed dataset (.bin/.idx)",
    "npy": "a .npy array file",
    "png": "a PNG image",
    "table": "a results table (.jsonl/.csv)",
    "memorization_report": "a memorization-report folder (report.txt, report.json, PNGs)",
    "count": "a count table (.jsonl/.csv of 'pythia-jax count', its locations or a host shard)",
    "gap_table": "a frequency-gap table (.csv of 'pythia-jax term-frequency')",
    "report": "an audit report (.json of 'pythia-jax audit')",
}
# The first line of the tables of 'pythia-jax count' (and their locations) and 'term-frequency'.
_COUNT_COLUMNS = ({"window_start", "window_end", "term", "variant"}, {"term", "variant", "step", "row_in_step"})
_GAP_HEADER = "operation,step,k,gap"
_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_IDX_MAGIC = b"MMIDIDX\x00\x00"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(path))).resolve(strict=False)


def _visible(entries: Sequence[Path]) -> list[Path]:
    return [e for e in entries if not e.name.startswith(".")]


def _list_dir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def path_kind(path: str | os.PathLike) -> str | None:
    """What an existing path looks like: None (absent), ``"empty"`` (an empty folder), one of
    ``KIND_NAMES`` (``"hf"``, ``"checkpoint"``, ``"neox"``, ``"steps"``, ``"npy"``, ``"png"``,
    ``"table"``, ``"dataset"`` for an ``.idx`` file, ``"count"``, ``"gap_table"``, ``"report"``,
    ``"memorization_report"``), ``"run"`` (a training run directory:
    ``metrics.jsonl``, ``checkpoints/`` or ``tensorboard/``), ``"protected"`` (home, working
    folder, root or above them) or ``"other"``."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not (p.exists() or p.is_symlink()):
        return None
    r = _resolved(p)
    if r == Path(r.anchor) or any(r == q or r in q.parents for q in _protected()):
        return "protected"
    if r.is_file():
        head = _head(r, 16)
        if head.startswith(_NPY_MAGIC):
            return "npy"
        if head.startswith(_PNG_MAGIC):
            return "png"
        if head.startswith(_IDX_MAGIC):
            return "dataset"
        if r.suffix in (".jsonl", ".csv") and (r.stat().st_size == 0 or _is_table(r)):
            return "table"
        return _own_file_kind(r, head)
    if not r.is_dir():
        return "other"
    entries = _list_dir(r)
    names = {e.name for e in entries}
    visible = _visible(entries)
    if not visible:
        return "empty"
    if "metrics.jsonl" in names or (r / "checkpoints").is_dir() or (r / "tensorboard").is_dir():
        return "run"
    if "model_config.json" in names and all(
            re.fullmatch(r"\d+(\.unusable-\d+|\.orbax-checkpoint-tmp.*)?|model_config\.json", e.name)
            for e in visible):
        return "checkpoint"
    if "latest" in names and any(re.fullmatch(r"global_step\d+", e.name) and e.is_dir() for e in visible) \
            and all(e.is_file() or re.fullmatch(r"global_step\d+", e.name) for e in visible):
        return "neox"
    if "config.json" in names and any(HF_WEIGHTS.match(n) for n in names) \
            and not any(e.is_dir() for e in visible):
        return "hf"
    if all(e.is_dir() and re.fullmatch(r"step\d+", e.name) for e in visible):
        return "steps"
    if "report.json" in names and all(
            e.is_file() and re.fullmatch(r"report\.(txt|json)|qq_step\d+\.png|correlation\.png", e.name)
            for e in visible):
        return "memorization_report"
    return "other"


def _first_row(path: Path) -> tuple[str, set[str]]:
    """(first line, its column names) of a .csv or .jsonl file (no columns when it is not a
    JSON object or not valid JSON)."""
    head = _head(path, 4096).decode("utf-8", "replace")
    first = head.splitlines()[0] if head else ""
    if path.suffix == ".csv":
        return first, set(first.split(","))
    try:
        row = json.loads(first)
    except ValueError:
        return first, set()
    return first, set(row) if isinstance(row, dict) else set()


def _is_table(path: Path) -> bool:
    first, columns = _first_row(path)
    if path.suffix == ".csv":
        return first.startswith("step,task,metric")
    return {"step", "task", "metric", "value"} <= columns


def _own_file_kind(path: Path, head: bytes) -> str:
    """``"count"``, ``"gap_table"``, ``"report"`` for the files of those commands, else ``"other"``."""
    if path.suffix == ".json":
        if re.match(rb'\{\s*"manifest":', head):  # a count host shard (json.dumps, manifest first)
            return "count"
        if re.match(rb'\{\s*"directory":', head):  # an audit report (write_report_json)
            return "report"
        return "other"
    if path.suffix not in (".jsonl", ".csv"):
        return "other"
    first, columns = _first_row(path)
    if path.suffix == ".csv" and first == _GAP_HEADER:
        return "gap_table"
    return "count" if any(c <= columns for c in _COUNT_COLUMNS) else "other"


def _protected() -> list[Path]:
    out = []
    for p in (os.path.expanduser("~"), os.getcwd()):
        with contextlib.suppress(OSError):
            out.append(_resolved(p))
    return out


def describe_path(path: str | os.PathLike) -> str:
    """One phrase for what ``path`` looks like (for refusals)."""
    kind = path_kind(path)
    if kind in KIND_NAMES:
        return KIND_NAMES[kind]
    if kind == "run":
        return "a training run directory (metrics.jsonl / checkpoints/ / tensorboard/)"
    if kind == "protected":
        return "the home folder, the working folder, the root or a folder above them"
    if kind == "empty":
        return "an empty folder"
    r = _resolved(path)
    if r.is_dir():
        names = [e.name for e in _list_dir(r)]
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        return f"a folder of {len(names)} other entries ({shown})"
    return "an unrelated file" if r.is_file() else "something that is not a file or folder"


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "is inside"
    if out in inp.parents:
        return "contains"
    return None


def path_relation(path: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How ``path`` lies to ``other``: ``"is"``, ``"is inside"``, ``"contains"`` or None (symlinks
    resolved; URLs (``gs://…``) compared as normalised strings)."""
    o, i = os.fspath(path), os.fspath(other)
    if is_url(o) or is_url(i):
        a, b = o.rstrip("/") + "/", i.rstrip("/") + "/"
        return "is" if a == b else "is inside" if a.startswith(b) else "contains" if b.startswith(a) else None
    return _relation(_resolved(o), _resolved(i))


def check_inputs(out: str | os.PathLike, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (``path_relation``)."""
    for inp in inputs:
        if inp is None:
            continue
        o, i = os.fspath(out), os.fspath(inp)
        rel = path_relation(o, i)
        if rel:
            raise PythiaJaxError(f"output {o} {rel} the input {i}; writing it would replace or mix with "
                                 "its own source: choose an output outside the input (and not above it)")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, *, kind: str | None = None,
                     inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse an output folder before any work starts; return its absolute path.

    Refused (``PythiaJaxError``, one line): an output that is, contains or lies inside one of
    ``inputs``; the home / working folder / root or above; an existing path (other than an
    empty folder) without ``overwrite``; with ``overwrite``, an existing path that is not a folder
    of the same ``kind`` (``KIND_NAMES``: ``"hf"``, ``"checkpoint"``, ``"neox"``) — a training run
    directory or any other folder is never replaced. ``kind=None`` replaces only empty folders.
    """
    out = Path(out_dir).expanduser().absolute()
    check_inputs(out, inputs)
    found = path_kind(out)
    if found == "protected":
        raise PythiaJaxError(f"output {out} is {describe_path(out)}; refusing to write there: "
                             "choose a new folder for the output")
    if found is None or found == "empty":
        return out
    what = describe_path(out)
    if not overwrite:
        raise PythiaJaxError(f"output {out} already exists ({what}); pass --overwrite "
                             "(overwrite=True) to replace it, or choose another output")
    if found != kind:
        wanted = KIND_NAMES.get(kind or "", "an output of this command")
        raise PythiaJaxError(f"output {out} is {what}, not {wanted}; --overwrite replaces only an "
                             "output of the same kind: choose another output, or move that one away yourself")
    return out


def check_output_file(path: str | os.PathLike, kind: str, *, inputs: Sequence[str | os.PathLike] = (),
                      overwrite: bool = True) -> Path:
    """Refuse an output file (``kind``: ``"npy"``, ``"png"``, ``"table"``, ``"dataset"``) that is one
    of ``inputs``, or an existing path that is not a file of the same kind (a folder, a run's
    ``metrics.jsonl``, any other file). Same-kind files are replaced when ``overwrite``."""
    out = Path(path).expanduser().absolute()
    check_inputs(out, inputs)
    found = path_kind(out)
    if found is None:
        return out
    what = describe_path(out)
    if found != kind:
        raise PythiaJaxError(f"output {out} exists and is {what}, not {KIND_NAMES[kind]}; refusing to "
                             "replace it: choose another output path")
    if not overwrite:
        raise PythiaJaxError(f"output {out} already exists ({what}); pass --overwrite to replace it")
    return out


# ------------------------------------------------------------------------- temporaries, publishing
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)@(?P<host>[^/]*)-[0-9a-f]{8}$")
STALE_REMOTE_SECONDS = 24 * 3600  # another host's temporaries: removed only when this old


def _tag() -> str:
    return f"{os.getpid()}@{socket.gethostname()}-{secrets.token_hex(4)}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_sibling(final: str | os.PathLike, *, directory: bool = False) -> Path:
    """Create a hidden temporary sibling of ``final`` (same folder, so the rename is atomic):
    ``.NAME.tmp-PID@HOST-XXXXXXXX``; a folder when ``directory``. Leftovers of killed writers of
    the same ``final`` are removed first (``clean_stale_temps``)."""
    final = Path(final).expanduser().absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final)
    tmp = final.parent / f".{final.name}.tmp-{_tag()}"
    if directory:
        tmp.mkdir()
    else:
        tmp.touch(exist_ok=False)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_temps(final: str | os.PathLike) -> list[str]:
    """Remove the temporaries (``.NAME.tmp-*``) and set-aside old copies (``.NAME.old-*``) of
    ``final`` left by a writer that was killed: on this host when its process is gone, from
    another host when older than ``STALE_REMOTE_SECONDS``. A set-aside copy whose ``final`` is
    missing (killed while publishing) is renamed back instead. Each is logged as a warning;
    returns the names handled."""
    final = Path(final).expanduser().absolute()
    host = socket.gethostname()
    handled = []
    for p in _list_dir(final.parent):
        m = _TMP_RE.match(p.name)
        if not m or m.group("name") != final.name:
            continue
        if m.group("host") == host:
            if _alive(int(m.group("pid"))):
                continue
        else:
            with contextlib.suppress(OSError):
                if time.time() - p.lstat().st_mtime < STALE_REMOTE_SECONDS:
                    continue
        if m.group("what") == "old" and not (final.exists() or final.is_symlink()):
            logger.warning("%s: restoring %s, set aside by a writer that was killed (pid %s on %s)",
                           final, p.name, m.group("pid"), m.group("host"))
            os.rename(p, final)
        else:
            logger.warning("%s: removing %s, left by a writer that was killed (pid %s on %s)",
                           final, p.name, m.group("pid"), m.group("host"))
            _remove(p)
        handled.append(p.name)
    return handled


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        # a file created meanwhile (a writer thread still finishing) makes one pass fail with
        # ENOTEMPTY; retry until the folder is gone
        for attempt in range(50):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                return
            time.sleep(0.01 * attempt)
        logger.warning("could not remove the temporary folder %s; remove it by hand", path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _chmod_published(path: Path) -> None:
    """The mode an ordinary ``open``/``mkdir`` gives under the user's umask (mkstemp / mkdtemp
    make 0600 / 0700)."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def publish(pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]]) -> None:
    """Rename each temporary onto its final path, all together or none.

    Existing finals are first set aside (``.NAME.old-…``), then every temporary is renamed in,
    then the old copies are removed. An exception at any point puts the old copies back and
    removes the temporaries, so the previous outputs stay intact. A final that is a folder
    where the temporary is a file (or the other way round) is refused (``PythiaJaxError``)
    before anything is renamed. Modes get the user's umask.
    """
    pairs = [(Path(t), Path(f).expanduser().absolute()) for t, f in pairs]
    moved: list[tuple[Path, Path]] = []  # (final, old copy)
    done: list[Path] = []
    try:
        raise_if_interrupted()  # a Ctrl-C that Python dropped ("Exception ignored in …") still counts
        for tmp, final in pairs:  # a file never replaces a folder (nor a folder a file)
            if (final.is_dir() and not final.is_symlink()) != tmp.is_dir() and final.exists():
                what = "a folder" if final.is_dir() else "a file"
                raise PythiaJaxError(f"output {final} is {what}; refusing to replace it with "
                                     f"{'a folder' if tmp.is_dir() else 'a file'}: choose another output path")
        for tmp, _ in pairs:
            _chmod_published(tmp)
        for _, final in pairs:
            if final.exists() or final.is_symlink():
                old = final.parent / f".{final.name}.old-{_tag()}"
                os.rename(final, old)
                moved.append((final, old))
        for tmp, final in pairs:
            os.rename(tmp, final)
            done.append(final)
    except BaseException:
        for final in done:
            _remove(final)
        for final, old in moved:
            with contextlib.suppress(OSError):
                os.rename(old, final)
        for tmp, _ in pairs:
            _remove(tmp)
        raise
    for _, old in moved:
        _remove(old)


@contextlib.contextmanager
def atomic_files(*finals: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield temporary sibling paths for ``finals`` (created empty); when the block succeeds
    they are published together (``publish``); on any exception they are removed, and so are the
    folders created for them while still empty, and the ``finals`` are left as they were."""
    temps: list[Path] = []
    created = [outermost_missing(Path(f).expanduser().absolute().parent) for f in finals]
    try:
        for f in finals:
            temps.append(temp_sibling(f))
        yield temps
    except BaseException:
        for t in temps:
            _remove(t)
        for f, top in zip(finals, created):
            remove_empty_folders(Path(f).expanduser().absolute().parent, top)
        raise
    publish(list(zip(temps, finals)))


def outermost_missing(folder: str | os.PathLike) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (what creating it will
    create, for ``remove_empty_folders`` after a failure), None when it exists."""
    folder, top = Path(os.path.abspath(os.path.expanduser(os.fspath(folder)))), None
    while not folder.exists() and folder != folder.parent:
        top, folder = folder, folder.parent
    return top


def remove_empty_folders(folder: str | os.PathLike, top: Path | None) -> None:
    """Remove ``folder`` and its parents up to ``top`` (``outermost_missing`` before they were
    created) while they are empty: a failed output leaves no folder it created."""
    if top is None:
        return
    folder = Path(os.path.abspath(os.fspath(folder)))
    while folder == top or top in folder.parents:
        try:
            folder.rmdir()  # only while empty: whatever someone else wrote there stays
        except OSError:
            return
        folder = folder.parent


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and a rename.

    The text is written with ``etils.epath`` (one writer for local files and ``gs://`` objects;
    ``path`` may be an ``epath.Path``). A local path goes through :func:`atomic_files` (hidden
    ``.NAME.tmp-…`` sibling, leftovers of killed writers cleaned, umask mode; on an error the
    temporary is removed and the previous file stays). A URL (``gs://…``) is written to a sibling
    object and renamed (an object store's rename is a copy and a delete, so readers see the old or
    the whole new object, never a partial one).
    """
    from etils import epath

    text_path = os.fspath(path)
    if text_path.startswith("file://"):
        text_path = text_path[len("file://"):]
    if not is_url(text_path):
        with atomic_files(text_path) as (tmp,):
            epath.Path(tmp).write_text(text, encoding="utf-8")
        return
    final = epath.Path(text_path)
    tmp = final.parent / f".{final.name}.tmp-{_tag()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.rename(final)
    except BaseException:
        with contextlib.suppress(Exception):
            if tmp.exists():
                tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, *, kind: str | None = None,
                      inputs: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder of ``out_dir``; on success rename it to ``out_dir``.

    ``check_output_dir`` decides first (and again just before the rename) whether ``out_dir``
    may be written / replaced. On any exception (KeyboardInterrupt included) the temporary
    folder is removed and ``out_dir`` is left as it was. With ``overwrite`` an existing
    ``out_dir`` of the same ``kind`` is replaced only after the new one is complete. The
    published folder gets mode ``0o777 & ~umask``.
    """
    out = check_output_dir(out_dir, overwrite, kind=kind, inputs=inputs)
    tmp = temp_sibling(out, directory=True)
    try:
        yield tmp
        raise_if_interrupted()
        check_output_dir(out, overwrite, kind=kind)  # it may have appeared while we were writing
    except BaseException:
        _remove(tmp)
        raise
    publish([(tmp, out)])
