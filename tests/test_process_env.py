"""process_env: the pythia-jax entry point re-executes once with glibc's huge-page tunable."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from pythia_jax.process_env import OPT_OUT, TUNABLE, huge_page_environment, without_huge_pages

GLIBC = ("glibc", "2.36")
THP = "always [madvise] never\n"


@pytest.mark.parametrize("environ, libc, thp, tunables", [
    ({}, GLIBC, THP, TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, THP, "glibc.malloc.arena_max=2:" + TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, THP, None),  # the user's own choice stays
    ({OPT_OUT: "0"}, GLIBC, THP, None),
    ({"PYTHIA_JAX_REEXECUTED": "1"}, GLIBC, THP, None),  # never twice
    ({}, ("glibc", "2.34"), THP, None),  # the tunable is new in 2.35
    ({}, ("", ""), THP, None),  # musl, macOS: no glibc
    ({}, GLIBC, "always madvise [never]\n", None),
    ({}, GLIBC, None, None),  # no transparent huge pages in this kernel
])
def test_huge_page_environment(environ, libc, thp, tunables):
    env = huge_page_environment(environ, libc, thp)
    if tunables is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == tunables and env["PYTHIA_JAX_REEXECUTED"] == "1"
        assert {k: v for k, v in env.items() if k not in ("GLIBC_TUNABLES", "PYTHIA_JAX_REEXECUTED")} \
            == {k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}


def _thp_usable() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read()
    except OSError:
        return False
    return huge_page_environment({}, platform.libc_ver(), thp) is not None


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _thp_usable(),
                    reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_reexec_keeps_pid_and_arguments(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        from pythia_jax.process_env import reexec_with_huge_pages
        with open(sys.argv[1], "a") as f:
            f.write(f"{os.getpid()} {sys.argv[2]} {os.environ.get('GLIBC_TUNABLES', '-')}\\n")
        reexec_with_huge_pages()
    """)
    log = tmp_path / "log.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    subprocess.run([sys.executable, "-c", script, str(log), "an argument"], check=True, env=env, timeout=60)
    first, second = log.read_text().splitlines()
    assert first.split(" ", 1)[0] == second.split(" ", 1)[0]  # same process
    assert first.endswith("an argument -") and second.endswith(f"an argument {TUNABLE}")
    # turned off: runs once
    log.unlink()
    subprocess.run([sys.executable, "-c", script, str(log), "x"], check=True, env={**env, OPT_OUT: "0"},
                   timeout=60)
    assert len(log.read_text().splitlines()) == 1


def test_without_huge_pages_restores_the_environment_before_start_up():
    """What a peer process gets (bench_train's PyTorch side): the environment before our start-up
    added the tunable, and no re-execution of its own; a tunable the user set stays."""
    before = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}
    after = huge_page_environment(before, GLIBC, THP)
    assert without_huge_pages(after) == {**before, OPT_OUT: "0"}
    own = {"GLIBC_TUNABLES": TUNABLE}
    assert without_huge_pages(own) == {**own, OPT_OUT: "0"}
