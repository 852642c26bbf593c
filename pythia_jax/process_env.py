"""Process-level settings: large host allocations on transparent huge pages (applied before anything
heavy is imported), and environment variables set for the length of one block (``environment_set``).

Why: XLA:CPU allocates a step's temporary buffer (2.0 GB for a pythia-160m train step at batch
4 × 256, about 3.3 GB at pythia-410m 2 × 256) afresh for every execution, from an XLA worker
thread, which glibc serves with a new ``mmap`` and unmaps afterwards. Every step then faults in and
zeroes those pages again, 4 KiB at a time: 519k minor faults and 1.0-1.3 s of system CPU per 160m
step, 835k and 2.8 s per 410m step. With glibc's ``glibc.malloc.hugetlb=1`` tunable (glibc ≥ 2.35,
``madvise`` transparent huge pages for malloc's mappings) the same 410m step faulted 2.8k times and
took 8.5 s instead of 10.0 s (PyTorch's step, whose large tensors are allocated on the main thread,
went from 9.0 to 8.9 s). glibc reads its tunables only at process start, so the ``pythia-jax``
entry point re-executes itself once with the tunable added (same PID, same arguments); nothing
else about the process changes. ``PYTHIA_JAX_HUGEPAGES=0`` turns this off; a ``GLIBC_TUNABLES``
that already sets ``glibc.malloc.hugetlb`` is left as it is.

References: glibc manual, "Memory Allocation Tunables" (``glibc.malloc.hugetlb``); Linux
``Documentation/admin-guide/mm/transhuge.rst`` (``madvise`` mode).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from typing import Iterator, Mapping

logger = logging.getLogger(__name__)

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "PYTHIA_JAX_HUGEPAGES"   # "0": do not re-execute
_MARKER = "PYTHIA_JAX_REEXECUTED"  # set in the re-executed process (never loops)
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_environment(environ: Mapping[str, str], libc: tuple[str, str],
                          thp_setting: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing should change.

    environ: the current environment; libc: ``platform.libc_ver()`` (name, version);
    thp_setting: the contents of ``/sys/kernel/mm/transparent_hugepage/enabled`` (None if absent).
    None when: turned off (``PYTHIA_JAX_HUGEPAGES=0``), already re-executed, not glibc ≥ 2.35,
    transparent huge pages absent or ``[never]``, or ``GLIBC_TUNABLES`` already sets the tunable.
    """
    if environ.get(OPT_OUT, "1") == "0" or environ.get(_MARKER):
        return None
    name, version = libc
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or (major, minor) < (2, 35):
        return None
    if not thp_setting or "[never]" in thp_setting:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    env[_MARKER] = "1"
    return env


def without_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` as it was before ``reexec_with_huge_pages`` added ``TUNABLE``, with the opt-out
    set so that a child process started with it does not add it again (e.g. a peer that should run
    under its own defaults). A tunable the user set is kept."""
    env = dict(environ)
    env[OPT_OUT] = "0"
    if env.pop(_MARKER, None):
        kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != TUNABLE]
        env["GLIBC_TUNABLES"] = ":".join(kept)
    return env


def reexec_with_huge_pages() -> None:
    """Re-execute this process (``os.execve``: same PID, same command line) with ``TUNABLE`` in
    ``GLIBC_TUNABLES`` when ``huge_page_environment`` says so; otherwise return at once.

    Call it first thing in a program's entry point, before threads start or files are written;
    it does not return when it re-executes. Linux only; a no-op elsewhere.
    """
    if not sys.platform.startswith("linux") or not sys.executable:
        return
    try:
        with open(_THP_SETTING) as f:
            thp = f.read()
    except OSError:
        thp = None
    env = huge_page_environment(os.environ, platform.libc_ver(), thp)
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError as e:  # e.g. a sandbox without exec: run on as we are
        logger.debug("re-executing with %s failed (%s); continuing without it", TUNABLE, e)


@contextlib.contextmanager
def environment_set(values: Mapping[str, str]) -> Iterator[None]:
    """Set the environment variables ``values`` while the block runs, then restore each one's
    previous value (or its absence), also when the block raises. Used where a library reads a
    variable (``TQDM_DISABLE``, lm-evaluation-harness's ``DISABLE_MULTIPROC``) and a command run
    in-process (``cli.main``) must not leave it set for the rest of the process. A library that
    reads it once, at import (tqdm reads ``TQDM_*`` then), keeps what it read: the setting acts
    only if the block first imports it, and then stays with that import."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
