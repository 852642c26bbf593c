"""The ``pythia-jax`` entry point: subcommand discovery, gin flag conventions, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pythia_jax import cli
from pythia_jax.config import ModelConfig, preset_names


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "pythia_jax.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name, _ in cli.SUBCOMMANDS + cli.PASSTHROUGH_COMMANDS:
        assert f"\n    {name}" in out, name


@pytest.mark.parametrize("argv, rest, files, bindings", [
    (["train", "--gin_file=a.gin", "--gin_file", "b.gin", "--x", "1"], ["train", "--x", "1"],
     ["a.gin", "b.gin"], []),
    (["train", "--gin.TrainConfig.num_steps=5", "--gin.ModelConfig.name", "'m'"], ["train"], [],
     ["TrainConfig.num_steps = 5", "ModelConfig.name = 'm'"]),
    (["batches", "--data", "p"], ["batches", "--data", "p"], [], []),
])
def test_gin_flags_follow_the_t5x_convention(argv, rest, files, bindings):
    assert cli.split_gin_flags(argv) == (rest, files, bindings)


def test_gin_flag_without_value_is_refused():
    with pytest.raises(SystemExit, match="needs a path"):
        cli.split_gin_flags(["train", "--gin_file"])


def test_gin_flags_on_a_command_without_gin_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "--gin.ModelConfig.hidden_size=8"])
    assert "does not take gin flags" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a passthrough command behind gin flags (was an AttributeError)
        cli.main(["--gin_file=x.gin", "lm-eval"])
    assert "'lm-eval' does not take gin flags" in capsys.readouterr().err


def test_info_lists_presets_and_prints_one_config(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in preset_names():
        assert name in out
    assert "70,426,624" in out and "11,846,072,320" in out
    assert cli.main(["info", "pythia-160m"]) == 0
    assert '"hidden_size": 768' in capsys.readouterr().out


def test_input_errors_are_one_line_with_status_2(capsys):
    assert cli.main(["info", "pythia-13b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model name 'pythia-13b'" in err[0]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig(hidden_act="relu")
