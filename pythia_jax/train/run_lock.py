"""The lock on a run directory: one ``pythia-jax train`` per ``output_dir`` at a time.

``<output_dir>/train.lock`` holds JSON ``{"host", "pid", "started", "command"}`` of the holder.

Local directories (and the local mirror folder of a ``gs://`` run): the holder keeps an exclusive
``fcntl.flock`` on the open file for its whole life. The kernel drops that lock when the process
ends in any way (exit, SIGKILL, crash), so a second ``train`` whose ``flock`` fails is refused
(naming the holder), and a lock file whose ``flock`` succeeds is stale: it is replaced, with a
warning naming the dead holder. A stale file written by another host is not replaced (on a shared
file system without working locks its holder may still be running there): the refusal says to
delete it once that run has ended. Linux NFS maps ``flock`` onto NFS byte-range locks, so two
hosts sharing an NFS ``output_dir`` exclude each other too.

``gs://`` output: besides the local mirror's lock, an object ``<output_dir>/train.lock`` is
written. Cloud Storage has no process liveness, so an existing object from another host (or from
a live process of this host) refuses the run, and one left by a dead process of this host is
replaced with a warning. The existence check and the write are two requests (``etils.epath``
cannot send GCS's ``ifGenerationMatch=0`` create-only precondition), so two commands started on
different machines within the same second can both pass; everything else is refused.

Multi-host runs: only process 0 takes the lock; every process learns the outcome (a broadcast),
so all of them stop together.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from typing import Any

from pythia_jax.errors import PythiaJaxError
from pythia_jax.io_utils import is_url

logger = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


class RunDirectoryLocked(PythiaJaxError):
    """Another ``train`` holds (or may hold) the run directory's lock."""


def _holder_info() -> dict[str, Any]:
    command = " ".join(sys.argv)
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command[:500]}


def _describe(info: dict | None) -> str:
    if not info:
        return "an unknown process (the lock file is empty or unreadable)"
    return (f"process {info.get('pid')} on host {info.get('host')} (started {info.get('started')}: "
            f"{str(info.get('command', ''))[:120]})")


def _parse(text: str) -> dict | None:
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists (another user's) or unreadable: assume alive
    return True


@dataclasses.dataclass
class RunLock:
    """A held lock; ``release()`` (idempotent) removes it."""

    path: str
    info: dict
    _fd: int | None = None
    remote: Any = None  # epath.Path of the gs:// lock object, when there is one

    def release(self) -> None:
        if self.remote is not None:
            try:
                if _parse(self.remote.read_text()) == self.info:
                    self.remote.unlink()
            except Exception as e:  # noqa: BLE001 - never fail a finished run over its lock
                logger.warning("could not remove the lock object %s: %s", self.remote, e)
            self.remote = None
        if self._fd is not None:
            try:
                if _same_file(self._fd, self.path):
                    os.remove(self.path)
            except OSError:
                pass
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock_local(directory: str, info: dict) -> RunLock:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_FILE)
    for _ in range(10):  # retried only when the file is replaced between open and flock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise RunDirectoryLocked(
                f"{directory} is in use by another training run: {_describe(holder)}; wait for it "
                f"to end or use another output_dir (lock: {path})") from None
        except OSError as e:
            os.close(fd)
            raise RunDirectoryLocked(f"cannot lock {path}: {e.strerror}; use an output_dir on a "
                                     "file system that supports file locks") from None
        if not _same_file(fd, path):  # released (unlinked) by its holder meanwhile: take the new one
            os.close(fd)
            continue
        previous = _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")) if os.fstat(fd).st_size else None
        if previous is not None:
            if previous.get("host") != info["host"]:
                os.close(fd)
                raise RunDirectoryLocked(
                    f"{path} names {_describe(previous)}, another host: if that run has ended, delete "
                    "the lock file and rerun; otherwise use another output_dir")
            logger.warning("replacing the stale lock %s of %s, which is no longer running", path,
                           _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        return RunLock(path=path, info=info, _fd=fd)
    raise RunDirectoryLocked(f"{path} keeps changing: another training run is starting in {directory}")


def _lock_remote(output_dir: str, info: dict):
    from etils import epath

    path = epath.Path(output_dir) / LOCK_FILE
    if path.exists():
        previous = _parse(path.read_text())
        stale = (previous is not None and previous.get("host") == info["host"]
                 and not _pid_alive(previous.get("pid")))
        if not stale:
            raise RunDirectoryLocked(
                f"{output_dir} is locked by {_describe(previous)}: if that run has ended, delete {path} "
                "and rerun; otherwise use another output_dir")
        logger.warning("replacing the stale lock %s of %s, which is no longer running", path,
                       _describe(previous))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info) + "\n")
    return path


def acquire(output_dir: str, local_dir: str) -> RunLock | None:
    """Lock the run directory (process 0; every process raises together on failure).

    ``local_dir``: where the run's local files go (``output_dir`` itself, or the local mirror of
    a URL). Returns the lock on process 0, None on the others. Raises ``RunDirectoryLocked``.
    """
    import jax

    lock: RunLock | None = None
    error: RunDirectoryLocked | None = None
    if jax.process_index() == 0:
        info = _holder_info()
        try:
            lock = _lock_local(local_dir, info)
            if is_url(output_dir):
                try:
                    lock.remote = _lock_remote(output_dir, info)
                except BaseException:
                    lock.release()
                    raise
        except RunDirectoryLocked as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = RunDirectoryLocked(f"process 0 could not lock {output_dir} (its log says why)")
    if error is not None:
        raise error
    return lock


__all__ = ["LOCK_FILE", "RunDirectoryLocked", "RunLock", "acquire"]
