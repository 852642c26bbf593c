#!/usr/bin/env python3
"""Cloud TPU VM helpers for pythia-jax: create a slice, install, train on every worker, logs, stop.

Every subcommand assembles ``gcloud`` commands and runs them; ``--dry-run`` prints them instead
(one per line, shell-quoted) so they can be reviewed or pasted. Standard library only.

    python scripts/tpu.py --name pythia --zone us-central2-b create --accelerator-type v4-64 --spot
    python scripts/tpu.py --name pythia --zone us-central2-b setup
    python scripts/tpu.py --name pythia --zone us-central2-b train \\
        --gin_file configs/train/pythia-1.4b.gin --gin.TrainConfig.output_dir="'gs://b/run'"
    python scripts/tpu.py --name pythia --zone us-central2-b logs
    python scripts/tpu.py --name pythia --zone us-central2-b stop     # SIGTERM: checkpoint + exit
    python scripts/tpu.py --name pythia --zone us-central2-b delete

Slices come from ``gcloud compute tpus tpu-vm create`` or, with ``--queued`` (or
``--node-count N`` for a multi-slice job), from ``gcloud compute tpus queued-resources create``.
Commands on workers use ``ssh --worker=all`` (``--node=all`` too for multi-slice), so every host
of the slice runs the same thing: JAX's ``jax.distributed.initialize()`` finds its peers by itself
on TPU VMs, and each process reads only its own rows.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

# Runtime (software) version per TPU generation for JAX (Cloud TPU docs, "TPU software versions").
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Paths on the workers (inside double quotes in the remote shell, so $HOME expands).
REMOTE_DIR = "$HOME/pythia-jax"
LOG_FILE = "$HOME/pythia-jax-train.log"
PID_FILE = "$HOME/pythia-jax-train.pid"
COUNT_LOG_FILE = "$HOME/pythia-jax-count.log"
COUNT_PID_FILE = "$HOME/pythia-jax-count.pid"
REMOTE_ARCHIVE = "pythia-jax-src.tar.gz"  # scp destinations are relative to the home directory
ARCHIVE = "/tmp/pythia-jax-src.tar.gz"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UsageError(ValueError):
    """Bad flags (printed as one line by ``main``)."""


def runtime_version(accelerator_type: str) -> str:
    """Default runtime version for an accelerator type such as ``v4-64`` or ``v5litepod-16``."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type)
    if not match:
        raise UsageError(f"accelerator type {accelerator_type!r} is not like v4-64 / v5p-128 / v5litepod-16")
    generation = match.group(1)
    if generation not in RUNTIME_VERSIONS:
        raise UsageError(f"no default runtime version for {generation}; pass --version")
    return RUNTIME_VERSIONS[generation]


# ------------------------------------------------------------------------------ gcloud pieces
def _location(args: argparse.Namespace) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def _multislice(args: argparse.Namespace) -> bool:
    return getattr(args, "node_count", 1) > 1 or bool(getattr(args, "multislice", False))


def ssh_all(args: argparse.Namespace, remote: str, *, worker: str = "all") -> list[str]:
    """``gcloud … ssh`` running ``remote`` (a shell string) on the workers of the slice(s)."""
    if args.multislice:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "ssh", args.name]
        cmd += _location(args) + [f"--worker={worker}", f"--node={'all' if worker == 'all' else '0'}"]
    else:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name] + _location(args)
        cmd += [f"--worker={worker}"]
    return cmd + [f"--command={remote}"]


def scp_all(args: argparse.Namespace, local: str, remote: str) -> list[str]:
    if args.multislice:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "scp", local, f"{args.name}:{remote}"]
        return cmd + _location(args) + ["--worker=all", "--node=all"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{args.name}:{remote}"] + \
        _location(args) + ["--worker=all"]


# ------------------------------------------------------------------------------ subcommands
def create_commands(args: argparse.Namespace) -> list[list[str]]:
    version = args.version or runtime_version(args.accelerator_type)
    if args.node_count < 1:
        raise UsageError("--node-count must be >= 1")
    if args.queued or args.node_count > 1:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name] + _location(args)
        cmd += [f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}"]
        if args.node_count > 1:
            cmd += [f"--node-count={args.node_count}", f"--node-prefix={args.name}"]
        else:
            cmd += [f"--node-id={args.name}"]
        if args.valid_until_duration:
            cmd.append(f"--valid-until-duration={args.valid_until_duration}")
    else:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name] + _location(args)
        cmd += [f"--accelerator-type={args.accelerator_type}", f"--version={version}"]
    if args.spot:
        cmd.append("--spot")
    if args.reserved:
        cmd.append("--reserved")
    if args.service_account:
        cmd.append(f"--service-account={args.service_account}")
    return [cmd]


def working_tree_ref(source_dir: str) -> str:
    """What ``setup`` copies by default: the checkout as it is. With uncommitted changes to tracked
    files, a commit of the working tree made by ``git stash create`` (nothing in the checkout,
    index or stash list changes), else ``HEAD``. Untracked files are not in any commit: they are
    named on stderr (``git add`` them to copy them)."""
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", "-C", source_dir, *cmd], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    untracked = git("ls-files", "--others", "--exclude-standard").splitlines()
    if untracked:
        shown = ", ".join(untracked[:5]) + (f" and {len(untracked) - 5} more" if len(untracked) > 5 else "")
        print(f"tpu.py: untracked files are not copied to the workers: {shown} (git add them to copy them)",
              file=sys.stderr)
    return git("stash", "create") or "HEAD"


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """Copy (or clone) the project onto every worker and install it with ``jax[tpu]`` in a venv."""
    commands: list[list[str]] = []
    d = f'"{REMOTE_DIR}"'
    if args.git_url:
        if args.ref in (None, "HEAD"):
            fetch = f"rm -rf {d} && git clone --depth 1 {shlex.quote(args.git_url)} {d}"
        else:
            fetch = (f"rm -rf {d} && git clone --depth 1 --branch {shlex.quote(args.ref)} "
                     f"{shlex.quote(args.git_url)} {d}")
    else:
        commands.append(["git", "-C", args.source_dir, "archive", "--format=tar.gz", f"--output={ARCHIVE}",
                         working_tree_ref(args.source_dir) if args.ref is None else args.ref])
        commands.append(scp_all(args, ARCHIVE, REMOTE_ARCHIVE))
        fetch = f'rm -rf {d} && mkdir -p {d} && tar -xzf "$HOME/{REMOTE_ARCHIVE}" -C {d}'
    if args.extras and not re.fullmatch(r"\[[A-Za-z0-9_,-]+\]", args.extras):
        raise UsageError(f"--extras must look like [name,other], got {args.extras!r}")
    # gcsfs: Orbax/etils open gs:// directories through fsspec (arrays go through tensorstore).
    requirements = " ".join(shlex.quote(r) for r in [args.jax_spec, "gcsfs", *args.pip])
    install = (f"python3 -m venv {d}/.venv && . {d}/.venv/bin/activate && "
               f"python -m pip install -q --upgrade pip && "
               f'python -m pip install -q -e "{REMOTE_DIR}{args.extras}" {requirements}')
    check = (f"{d}/.venv/bin/python -c "
             + shlex.quote("import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0])"))
    commands.append(ssh_all(args, f"set -e; {fetch} && {install} && {check}"))
    return commands


def background_command(argv: Sequence[str], env: Sequence[str], pid_file: str, log_file: str) -> str:
    """The shell line every worker runs: start ``argv`` in the project's venv in the background,
    unless it is already running there (pid file), with its output in ``log_file``."""
    what = " ".join(argv[:2])
    env_prefix = "".join(f"{shlex.quote(e)} " for e in env)
    pid, log = f'"{pid_file}"', f'"{log_file}"'
    return (f'cd "{REMOTE_DIR}" && . .venv/bin/activate && '
            f"if [ -f {pid} ] && kill -0 $(cat {pid}) 2>/dev/null; then "
            f"echo '{what} is already running on this worker' >&2; exit 1; fi; "
            f"{env_prefix}nohup {shlex.join(argv)} > {log} 2>&1 < /dev/null & "
            f"echo $! > {pid}; echo started pid $(cat {pid}) on $(hostname)")


def train_remote_command(args: argparse.Namespace) -> str:
    """Every worker starts ``pythia-jax train`` in the background (log + pid files)."""
    train = ["pythia-jax", "train"] + [f"--gin_file={f}" for f in args.gin_file]
    if args.distributed:
        # Every worker joins one JAX job; JAX finds the coordinator from the TPU metadata.
        train.append("--gin.DistributedConfig.initialize='yes'")
    train += list(args.train_args)
    return background_command(train, args.env, PID_FILE, args.log_file)


def count_remote_command(args: argparse.Namespace) -> str:
    """Every worker runs ``pythia-jax count`` on its share of the windows (``--num-hosts auto
    --host-index auto``: JAX's process count and index), in the background, logged; then
    ``pythia-jax count-merge`` on one machine combines the per-host files."""
    count = ["pythia-jax", "count", *args.count_args, "--num-hosts", "auto", "--host-index", "auto"]
    return background_command(count, args.env, COUNT_PID_FILE, args.log_file)


def count_commands(args: argparse.Namespace) -> list[list[str]]:
    if not any(a == "--out" or a.startswith("--out=") for a in args.count_args):
        raise UsageError("count needs --out (on a file system every worker writes to, e.g. gcsfuse, "
                         "or merge the per-host files afterwards with pythia-jax count-merge)")
    if any(a in ("--num-hosts", "--host-index") or a.startswith(("--num-hosts=", "--host-index="))
           for a in args.count_args):
        raise UsageError("count sets --num-hosts/--host-index itself (auto: one share per worker)")
    return [ssh_all(args, count_remote_command(args))]


def train_commands(args: argparse.Namespace) -> list[list[str]]:
    if not args.gin_file:
        raise UsageError("train needs at least one --gin_file")
    return [ssh_all(args, train_remote_command(args))]


def logs_commands(args: argparse.Namespace) -> list[list[str]]:
    tail = f"tail -n {args.lines} {'-F ' if args.follow else ''}\"{args.log_file}\""
    return [ssh_all(args, tail, worker=args.worker)]


def stop_commands(args: argparse.Namespace) -> list[list[str]]:
    """SIGTERM the trainer on every worker: it saves a checkpoint and exits (``--kill``: SIGKILL)."""
    sig = "KILL" if args.kill else "TERM"
    pid = f'"{PID_FILE}"'
    remote = (f"if [ -f {pid} ] && kill -0 $(cat {pid}) 2>/dev/null; then "
              f"kill -{sig} $(cat {pid}) && echo sent SIG{sig} to $(cat {pid}) on $(hostname); "
              f"else echo no running pythia-jax train on $(hostname); fi")
    return [ssh_all(args, remote)]


def status_commands(args: argparse.Namespace) -> list[list[str]]:
    if args.multislice or args.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "describe", args.name] + _location(args)]
    return [["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name] + _location(args)]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    if args.queued or args.multislice:
        # --force deletes the queued resource's TPU nodes first.
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name] + _location(args)
                + ["--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name] + _location(args) + ["--quiet"]]


def run_commands(args: argparse.Namespace) -> list[list[str]]:
    if not args.remote:
        raise UsageError("run needs a command")
    return [ssh_all(args, " ".join(args.remote), worker=args.worker)]


SUBCOMMANDS = {
    "create": create_commands, "setup": setup_commands, "train": train_commands, "count": count_commands,
    "logs": logs_commands,
    "stop": stop_commands, "status": status_commands, "delete": delete_commands, "run": run_commands,
}


# ------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/tpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU node name (and queued-resource id)")
    p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a (v5p)")
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's core/project)")
    p.add_argument("--multislice", action="store_true",
                   help="the TPU is a multi-slice queued resource (ssh/scp via queued-resources --node=all)")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="create a TPU VM slice (directly or as a queued resource)")
    c.add_argument("--accelerator-type", required=True, help="v4-64, v5p-128, v5litepod-16, …")
    c.add_argument("--version", default=None, help="runtime version (default from the generation, "
                   "e.g. tpu-ubuntu2204-base for v4, v2-alpha-tpuv5 for v5p)")
    c.add_argument("--spot", action="store_true", help="Spot capacity (preemptible: training resumes "
                   "from the last checkpoint)")
    c.add_argument("--reserved", action="store_true", help="use reserved capacity")
    c.add_argument("--queued", action="store_true", help="create through queued-resources (recommended)")
    c.add_argument("--node-count", type=int, default=1, help=">1: a multi-slice queued resource")
    c.add_argument("--valid-until-duration", default=None, help="queued: give up after e.g. 6h")
    c.add_argument("--service-account", default=None)

    s = sub.add_parser("setup", help="install the project and jax[tpu] on every worker")
    s.add_argument("--source-dir", default=REPO_ROOT, help="git checkout to copy (git archive of --ref; by "
                   "default the working tree, uncommitted changes to tracked files included)")
    s.add_argument("--git-url", default=None, help="clone this URL on the workers instead of copying")
    s.add_argument("--ref", default=None, help="commit/branch to install (default: the working tree of "
                   "--source-dir, uncommitted changes included; with --git-url: the default branch)")
    s.add_argument("--jax-spec", default="jax[tpu]", help="pip requirement for JAX on TPU")
    s.add_argument("--extras", default="", help="project extras, e.g. [lm_eval]")
    s.add_argument("--pip", action="append", default=[], help="extra pip requirement (repeatable)")

    t = sub.add_parser("train", help="start `pythia-jax train` on every worker (background, logged)")
    t.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable), relative to "
                   "the project directory on the workers")
    t.add_argument("--env", action="append", default=[], help="KEY=VALUE for the trainer (repeatable)")
    t.add_argument("--log-file", default=LOG_FILE)
    t.add_argument("--no-distributed", dest="distributed", action="store_false",
                   help="do not force jax.distributed.initialize() (default: forced, as pods need it)")

    cnt = sub.add_parser("count", help="run `pythia-jax count` on every worker, one share of the windows "
                         "each (background, logged); its flags pass through")
    cnt.add_argument("--env", action="append", default=[], help="KEY=VALUE for the counter (repeatable)")
    cnt.add_argument("--log-file", default=COUNT_LOG_FILE)

    lg = sub.add_parser("logs", help="show / stream the training log")
    lg.add_argument("--worker", default="0", help="worker index or 'all'")
    lg.add_argument("--lines", type=int, default=100)
    lg.add_argument("--no-follow", dest="follow", action="store_false")
    lg.add_argument("--log-file", default=LOG_FILE)

    st = sub.add_parser("stop", help="SIGTERM the trainer on every worker (checkpoint, clean exit)")
    st.add_argument("--kill", action="store_true", help="SIGKILL instead (no checkpoint)")

    stat = sub.add_parser("status", help="describe the TPU (or, with --queued, its queued resource)")
    stat.add_argument("--queued", action="store_true", help="describe the queued resource (its state: "
                      "WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE…)")
    d = sub.add_parser("delete", help="delete the TPU (and its queued resource)")
    d.add_argument("--queued", action="store_true", help="it was created with --queued")

    r = sub.add_parser("run", help="run a shell command on the workers")
    r.add_argument("--worker", default="all")
    r.add_argument("remote", nargs=argparse.REMAINDER)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse; ``train`` passes ``--gin.X=Y`` and any unknown flags through to ``pythia-jax train``."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(list(argv))
    if args.command == "train":
        args.train_args = unknown
    elif args.command == "count":
        args.count_args = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "create" and args.node_count > 1:
        args.multislice = True
    return args


def build_commands(argv: Sequence[str]) -> list[list[str]]:
    """The gcloud (and local) commands a command line stands for, in order."""
    args = parse_args(argv)
    return SUBCOMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        commands = SUBCOMMANDS[args.command](args)
    except UsageError as e:
        print(f"tpu.py: error: {e}", file=sys.stderr)
        return 2
    for cmd in commands:
        print(("" if args.dry_run else "+ ") + shlex.join(cmd), flush=True)
        if args.dry_run:
            continue
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"tpu.py: command failed with exit status {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
