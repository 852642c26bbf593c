"""scripts/tpu.py: the gcloud commands it assembles (dry run; nothing here talks to Google Cloud)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "tpu.py"

_spec = importlib.util.spec_from_file_location("pythia_tpu_script", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

BASE = ["--name", "pythia", "--zone", "us-central2-b", "--project", "proj"]


def commands(*argv: str) -> list[list[str]]:
    return tpu.build_commands([*BASE, *argv])


def remote_of(cmd: list[str]) -> str:
    (flag,) = [a for a in cmd if a.startswith("--command=")]
    return flag[len("--command="):]


def test_create_tpu_vm():
    (cmd,) = commands("create", "--accelerator-type", "v4-64", "--spot")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pythia", "--zone=us-central2-b",
                   "--project=proj", "--accelerator-type=v4-64", "--version=tpu-ubuntu2204-base", "--spot"]


def test_create_queued_resource_and_multislice():
    (cmd,) = commands("create", "--accelerator-type", "v5p-128", "--queued", "--valid-until-duration", "6h")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pythia"]
    assert "--node-id=pythia" in cmd and "--runtime-version=v2-alpha-tpuv5" in cmd
    assert "--valid-until-duration=6h" in cmd and "--version" not in " ".join(cmd)
    (cmd,) = commands("create", "--accelerator-type", "v5litepod-16", "--node-count", "2", "--version", "custom-rt")
    assert "--node-count=2" in cmd and "--node-prefix=pythia" in cmd and "--runtime-version=custom-rt" in cmd
    assert not any(a.startswith("--node-id") for a in cmd)


def test_runtime_versions_and_bad_accelerator():
    assert tpu.runtime_version("v4-8") == "tpu-ubuntu2204-base"
    assert tpu.runtime_version("v5litepod-16") == "v2-alpha-tpuv5-lite"
    assert tpu.runtime_version("v6e-64") == "v2-alpha-tpuv6e"
    with pytest.raises(tpu.UsageError, match="not like"):
        commands("create", "--accelerator-type", "tpu64")


def test_setup_copies_the_checkout_and_installs_jax_tpu_on_all_workers():
    archive, scp, ssh = commands("setup")
    assert archive[:2] == ["git", "-C"] and archive[3:-1] == ["archive", "--format=tar.gz", f"--output={tpu.ARCHIVE}"]
    assert archive[-1] == "HEAD" or re.fullmatch(r"[0-9a-f]{40}", archive[-1])  # the working tree's commit
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tpu.ARCHIVE, "pythia:pythia-jax-src.tar.gz",
                   "--zone=us-central2-b", "--project=proj", "--worker=all"]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pythia"] and "--worker=all" in ssh
    remote = remote_of(ssh)
    words = shlex.split(remote)
    assert "jax[tpu]" in words and "gcsfs" in words and "-e" in words and "$HOME/pythia-jax" in words
    assert words[words.index("-e") + 1] == "$HOME/pythia-jax"
    assert "python3" in words and "venv" in words


def test_setup_copies_uncommitted_changes_and_names_untracked_files(tmp_path, capsys):
    """"copy this checkout" archived HEAD: uncommitted edits never reached the workers, silently."""
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", "-C", str(tmp_path), *cmd], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "start")
    (tmp_path / "a.gin").write_text("x = 1\n")
    git("add", "a.gin")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    assert tpu.working_tree_ref(str(tmp_path)) == "HEAD"  # a clean checkout
    (tmp_path / "a.gin").write_text("x = 2\n")
    (tmp_path / "new.gin").write_text("y = 1\n")
    (archive, *_) = commands("setup", "--source-dir", str(tmp_path))
    ref = archive[-1]
    assert re.fullmatch(r"[0-9a-f]{40}", ref) and git("show", f"{ref}:a.gin") == "x = 2\n"
    assert "untracked files are not copied to the workers: new.gin" in capsys.readouterr().err
    (committed, *_) = commands("setup", "--source-dir", str(tmp_path), "--ref", "HEAD")  # asked: HEAD itself
    assert committed[-1] == "HEAD"
    assert git("stash", "list") == "" and (tmp_path / "a.gin").read_text() == "x = 2\n"  # nothing changed


def test_setup_from_git_url_with_extras():
    (ssh,) = commands("setup", "--git-url", "https://github.com/me/pythia-jax.git", "--ref", "v1",
                      "--extras", "[lm_eval]", "--pip", "gcsfs")
    words = shlex.split(remote_of(ssh))
    assert words[words.index("clone"):words.index("clone") + 6] == [
        "clone", "--depth", "1", "--branch", "v1", "https://github.com/me/pythia-jax.git"]
    assert "$HOME/pythia-jax[lm_eval]" in words and "gcsfs" in words
    with pytest.raises(tpu.UsageError, match="extras"):
        commands("setup", "--extras", "lm_eval; rm -rf /")


def test_train_launches_in_background_on_all_workers_with_gin_passthrough():
    (ssh,) = commands("train", "--gin_file", "configs/train/pythia-1.4b.gin",
                      "--gin.TrainConfig.output_dir='gs://bucket/pythia-1.4b'",
                      "--gin.MeshConfig.fsdp=32", "--env", "TPU_STDERR_LOG_LEVEL=2")
    assert "--worker=all" in ssh
    remote = remote_of(ssh)
    words = shlex.split(remote)
    i = words.index("nohup")
    assert words[i - 1] == "TPU_STDERR_LOG_LEVEL=2"
    assert words[i + 1:i + 7] == ["pythia-jax", "train", "--gin_file=configs/train/pythia-1.4b.gin",
                                  "--gin.DistributedConfig.initialize='yes'",
                                  "--gin.TrainConfig.output_dir='gs://bucket/pythia-1.4b'",
                                  "--gin.MeshConfig.fsdp=32"]
    assert words[i + 7:i + 9] == [">", "$HOME/pythia-jax-train.log"]
    assert "$HOME/pythia-jax-train.pid" in words and "&" in words
    with pytest.raises(tpu.UsageError, match="gin_file"):
        commands("train")
    (ssh,) = commands("train", "--gin_file", "a.gin", "--no-distributed")
    assert "DistributedConfig" not in remote_of(ssh)


def test_train_remote_command_is_valid_shell(tmp_path):
    (ssh,) = commands("train", "--gin_file", "configs/demo.gin", "--gin.TrainConfig.num_steps=5")
    subprocess.run(["bash", "-n", "-c", remote_of(ssh)], check=True)
    for argv in (["stop"], ["stop", "--kill"], ["logs"], ["setup"]):
        cmd = commands(*argv)[-1]
        subprocess.run(["bash", "-n", "-c", remote_of(cmd)], check=True)


def test_logs_stop_status_delete():
    (logs,) = commands("logs", "--worker", "3", "--lines", "20")
    assert "--worker=3" in logs and remote_of(logs) == 'tail -n 20 -F "$HOME/pythia-jax-train.log"'
    (stop,) = commands("stop")
    assert "--worker=all" in stop and "kill -TERM" in remote_of(stop)
    assert "kill -KILL" in remote_of(commands("stop", "--kill")[0])
    assert commands("status")[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "pythia"]
    assert commands("status", "--queued")[0][3:6] == ["queued-resources", "describe", "pythia"]
    assert commands("delete")[0] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pythia",
                                     "--zone=us-central2-b", "--project=proj", "--quiet"]
    assert commands("delete", "--queued")[0][3:6] == ["queued-resources", "delete", "pythia"]
    assert "--force" in commands("delete", "--queued")[0]


def test_multislice_uses_queued_resource_ssh_on_all_nodes():
    (ssh,) = commands("--multislice", "train", "--gin_file", "configs/train/pythia-1.4b.gin")
    assert ssh[3:5] == ["queued-resources", "ssh"] and "--node=all" in ssh and "--worker=all" in ssh


def test_dry_run_prints_and_runs_nothing():
    proc = subprocess.run([sys.executable, str(SCRIPT), *BASE, "--dry-run", "create", "--accelerator-type",
                           "v4-64"], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ("gcloud compute tpus tpu-vm create pythia --zone=us-central2-b "
                                   "--project=proj --accelerator-type=v4-64 --version=tpu-ubuntu2204-base")
    proc = subprocess.run([sys.executable, str(SCRIPT), *BASE, "--dry-run", "logs", "--bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


def test_count_runs_one_share_per_worker_and_passes_flags_through(tmp_path):
    (cmd,) = commands("count", "--data", "gs://b/pile/document", "--order", "preshuffled",
                      "--preset", "numerals", "--window", "13000", "--out", "/mnt/gcs/numerals.jsonl")
    assert "--worker=all" in cmd
    remote = remote_of(cmd)
    assert "pythia-jax count --data gs://b/pile/document --order preshuffled --preset numerals " \
           "--window 13000 --out /mnt/gcs/numerals.jsonl --num-hosts auto --host-index auto" in remote
    assert "pythia-jax-count.pid" in remote and "pythia-jax-count.log" in remote
    subprocess.run(["bash", "-n", "-c", remote], check=True)  # valid shell
    with pytest.raises(tpu.UsageError, match="needs --out"):
        commands("count", "--data", "x", "--preset", "numerals")
    with pytest.raises(tpu.UsageError, match="sets --num-hosts"):
        commands("count", "--data", "x", "--out", "o.jsonl", "--num-hosts", "4")
