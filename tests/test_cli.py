"""The ``pythia-jax`` entry point: subcommand discovery, gin flag conventions, one-line errors."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shlex
import subprocess
import sys
import types
import warnings

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
    # the next flag is not taken as the value (it swallowed --print_config)
    with pytest.raises(SystemExit, match=r"num_steps needs a value \(--gin.TrainConfig.num_steps=VALUE"):
        cli.split_gin_flags(["train", "--gin.TrainConfig.num_steps", "--print_config"])
    with pytest.raises(SystemExit, match="needs a path"):
        cli.split_gin_flags(["train", "--gin_file", "--gin.X=1"])
    assert cli.split_gin_flags(["train", "--gin.OptimizerConfig.max_lr", "-1"])[2] == ["OptimizerConfig.max_lr = -1"]


def test_a_misspelt_option_gets_the_commands_usage_and_the_closest_option(capsys, tmp_path):
    """``train --max-steps 3`` printed the top-level usage (pythia-jax [-h] [--version] COMMAND);
    a gin file that is a folder was reported as not found."""
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--gin_file=configs/demo.gin", "--max-steps", "3"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage: pythia-jax train" in err
    assert "unrecognized arguments: --max-steps 3 (--max-steps: did you mean --max_steps?)" in err
    assert cli.main(["train", f"--gin_file={tmp_path}"]) == 2
    assert f"gin file {str(tmp_path)!r} is a folder" in capsys.readouterr().err


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


def test_log_lines_start_on_a_fresh_line_under_a_progress_bar(monkeypatch):
    """A log record (or the Ctrl-C line) written while a tqdm bar is shown clears the bar's line
    first and redraws the bar after, instead of being appended to the bar's text."""
    import io
    import logging

    from tqdm import tqdm

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    # disable=False: an earlier `eval --no-progress` in this process set TQDM_DISABLE, which tqdm
    # reads once, as its default
    bar = tqdm(total=10, file=stream, unit="step", mininterval=0, miniters=1, disable=False)
    bar.update(3)
    with cli.console_logging():
        logging.getLogger("pythia_jax.train.loop").warning("interrupted at step 3")
    bar.close()
    text = stream.getvalue()
    head, sep, _ = text.partition("pythia-jax: warning: interrupted at step 3\n")
    assert sep and head.endswith("\r") and "3/10" in head, repr(text)


@pytest.mark.parametrize("argv", [["info", "pythia-70m"], ["info"]])
def test_closed_stdout_ends_quietly(argv):
    """``pythia-jax info pythia-70m | head -1`` printed "error: Broken pipe" and exited 2: a reader
    that goes away ends the command quietly with 141 (128 + SIGPIPE), like other Unix tools."""
    proc = subprocess.Popen([sys.executable, "-m", "pythia_jax.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    proc.stdout.close()  # before the command writes anything: its first write finds no reader
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_input_errors_are_one_line_with_status_2(capsys):
    assert cli.main(["info", "pythia-13b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model name 'pythia-13b'" in err[0]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig(hidden_act="relu")


# ------------------------------------------------------------------ help, version, numeric flags
def _subparsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items() if name not in dict(cli.PASSTHROUGH_COMMANDS)}


def test_every_option_of_every_subcommand_has_help_and_shows_its_default():
    subparsers = _subparsers()
    assert set(subparsers) == {name for name, _ in cli.SUBCOMMANDS}
    for name, p in subparsers.items():
        text = p.format_help()
        for action in p._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}"
            shown = action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings
            if shown:
                assert f"default: {action.default}" in " ".join(text.split()), f"{name} {action.option_strings}"
    batches = " ".join(subparsers["batches"].format_help().split())
    for default in ("(default without --checkpoints: 1024)", "(default without --checkpoints: 2048)",
                    "(default without --checkpoints: 1234)", "(default without --checkpoints: 143000)"):
        assert default in batches


def test_no_option_shows_its_default_twice_and_examples_continue_their_lines():
    """An option's help names its default once; in the descriptions every example line that goes
    on on the next line ends with a backslash (as the shell needs)."""
    for name, p in _subparsers().items():
        for action in p._actions:
            if action.option_strings and action.help:
                text = p._get_formatter()._expand_help(action)
                assert text.count("(default") <= max(1, action.help.count("(default")), (name, text)
        lines = (p.description or "").splitlines()
        for line in lines:  # a backslash-newline in a non-raw string joins two example lines
            if line.lstrip().startswith("pythia-jax"):
                assert not re.search(r"\S {4,}--", line.split("#")[0]), (name, line)
        for prev, line in zip(lines, lines[1:]):
            if re.match(r"^\s{4,}--", line) and (prev.lstrip().startswith("pythia-jax") or prev.endswith("\\")):
                assert prev.endswith(" \\"), (name, prev)


def test_count_help_names_the_locations_file_it_writes(tmp_path):
    from pythia_jax.commands import count

    assert "FILE.locations.jsonl or FILE.locations.csv, in the table's format" in count.DESCRIPTION


def test_version(capsys):
    import pythia_jax
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"pythia-jax {pythia_jax.__version__}"


@pytest.mark.parametrize("argv, flag, value", [
    (["batches", "--data", "d", "--start", "0", "--end", "0", "--batch-size", "0"], "--batch-size", "0"),
    (["batches", "--data", "d", "--start", "0", "--end", "0", "--train-iters", "-3"], "--train-iters", "-3"),
    (["preshuffle", "--data", "d", "--out", "o", "--shards", "0"], "--shards", "0"),
    (["preprocess", "--input", "i", "--output-prefix", "o", "--workers", "0"], "--workers", "0"),
    (["eval", "--checkpoints", "c", "--steps", "0", "--out", "o", "--limit", "-1"], "--limit", "-1"),
    (["eval", "--checkpoints", "c", "--steps", "0", "--out", "o", "--batch-size", "0"], "--batch-size", "0"),
    (["generate", "m", "--prompt", "p", "--top-p", "0"], "--top-p", "0"),
    (["generate", "m", "--prompt", "p", "--temperature", "-1"], "--temperature", "-1"),
    (["generate", "m", "--prompt", "p", "--max-new-tokens", "0"], "--max-new-tokens", "0"),
    (["generate", "m", "--prompt", "p", "--step", "-1"], "--step", "-1"),
    (["convert", "hf-to-jax", "a", "b", "--step", "-2"], "--step", "-2"),
    (["train", "--gin_file=configs/demo.gin", "--max_steps", "0"], "--max_steps", "0"),
    (["train", "--gin_file=configs/demo.gin", "--max_steps", "nan"], "--max_steps", "nan"),
])
def test_numeric_flags_are_validated_before_any_work(argv, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: expected" in err and repr(value) in err, err


def test_every_seed_flag_takes_the_seed_range(capsys):
    """A seed >= 2**32 (numpy RandomState's limit, which the GPT-NeoX order uses) is one line naming
    the flag and the range, for every subcommand that takes a seed, before any work."""
    from pythia_jax.commands import argtypes

    seeds = {(name, a.option_strings[0]) for name, p in _subparsers().items() for a in p._actions
             if "seed" in a.dest}
    assert {("batches", "--seed"), ("count", "--seed"), ("preshuffle", "--seed"), ("generate", "--seed"),
            ("eval", "--mem-order-seed"), ("eval", "--mem-seed")} <= seeds
    for name, p in _subparsers().items():
        for a in p._actions:
            if "seed" in a.dest:
                assert a.type is argtypes.seed, (name, a.option_strings)
    argv = {"batches": ["batches", "--data", "demo", "--order", "neox", "--start", "0", "--end", "0"],
            "count": ["count", "--data", "demo", "--text", "a", "--out", "c.csv"],
            "preshuffle": ["preshuffle", "--data", "demo", "--out", "o"],
            "generate": ["generate", "m", "--prompt", "p"],
            "eval": ["eval", "--checkpoints", "c", "--steps", "0", "--out", "o"]}
    for name, flag in sorted(seeds):
        for value in ("4294967296", "99999999999", "-1"):
            with pytest.raises(SystemExit) as e:
                cli.main(argv[name] + [flag, value])
            err = capsys.readouterr().err.strip()
            assert e.value.code == 2 and err.endswith(
                f"argument {flag}: expected an integer in [0, 2**32 - 1] = [0, 4294967295], got {value!r}"), err
    assert argtypes.seed("4294967295") == 2**32 - 1


def test_the_data_order_refuses_a_seed_outside_the_range():
    from pythia_jax.data import demo_data_prefix
    from pythia_jax.data.orders import open_order
    from pythia_jax.errors import DataError

    with pytest.raises(DataError, match=r"^the GPT-NeoX order seed 4294967296: expected an integer in "
                                        r"\[0, 2\*\*32 - 1\]"):
        open_order(demo_data_prefix(), "neox", seq_len=128, seed=2**32, train_iters=200, global_batch=8)


def test_an_unquoted_gin_string_says_how_to_quote_it(capsys):
    assert cli.main(["train", "--gin_file=configs/demo.gin", "--gin.TrainConfig.output_dir=runs/x",
                     "--print_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ast.Name" not in err[0]
    assert """quote a string inside the shell's quotes: --gin.TrainConfig.output_dir="'runs/x'\"""" in err[0]
    assert cli.main(["train", "--gin_file=configs/demo.gin", "--gin.TrainConfig.output_dir='runs/x'",
                     "--print_config"]) == 0


@pytest.mark.parametrize("binding, message", [
    ("--gin.TrainConfig.num_steps='abc'", "TrainConfig.num_steps must be an integer, got 'abc'"),
    ("--gin.TrainConfig.num_steps=0", "TrainConfig.num_steps must be a positive integer, got 0"),
    ("--gin.DataConfig.seed=4294967296",
     "DataConfig.seed must be an integer in [0, 2**32 - 1 = 4294967295], got 4294967296"),
])
def test_a_bad_gin_value_is_one_line_without_gins_call_context(binding, message, capsys):
    """Validated by the config class (no TypeError traceback), and printed without the
    "In call to configurable 'TrainConfig' (<class …>)" that gin appends to the message."""
    assert cli.main(["train", "--gin_file=configs/demo.gin", binding, "--print_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pythia-jax train: error: {message}"]
    assert cli.without_gin_context(
        "x must be 1\n  In call to configurable 'DataConfig' (<class 'a.DataConfig'>) in scope 'eval'"
        "\n  In call to configurable 'model_preset' (<function preset at 0x7f>)") == "x must be 1"


# ------------------------------------------------------------------------- one-line failures
def test_os_failures_name_the_path_reason_and_fix():
    args = argparse.Namespace(command="convert", output="/x/out")
    e = PermissionError(errno.EACCES, "Permission denied", "/x/.out.tmp-ab12cd")
    assert cli.describe_os_failure(e, args) == (
        "/x/out: Permission denied; no permission: choose a location you can write (another OUTPUT) "
        "or fix the permissions")
    e = OSError(errno.EROFS, "Read-only file system", "/ro/.x.npy.k2j3h4l5.tmp")
    assert cli.describe_os_failure(e, argparse.Namespace(command="batches", out="/ro/x.npy")) == (
        "/ro/x.npy: Read-only file system; the file system is read-only: choose another --out")
    # tensorstore / Orbax report a full disk in their own exception types: recognised by the text
    e = ValueError("FAILED_PRECONDITION: Error writing local file \"/d/ocdbt.process_0/d/x\":\n"
                   "[OS error 28: No space left on device] [source locations='tensorstore/...']")
    assert cli.describe_os_failure(e, args) == (
        "writing /x/out: No space left on device; free some space or choose another OUTPUT")
    try:  # an OSError behind another exception (raise ... from)
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/q/f")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert cli.describe_os_failure(outer, args).startswith("/q/f: Disk quota exceeded; free some space")
    assert cli.describe_os_failure(KeyError("x"), args) is None  # a programming error keeps its traceback


def test_warnings_are_one_readable_log_line(capsys, monkeypatch):
    module = types.SimpleNamespace(run=lambda args: warnings.warn(
        "checkpoint step 8 in /r/checkpoints is unusable (" + "tensorstore detail\n" * 60 + "); using step 4",
        stacklevel=1))
    assert cli._run(module, argparse.Namespace(command="eval")) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("pythia-jax: warning: checkpoint step 8 in /r/checkpoints is unusable")
    assert err[0].endswith("); using step 4") and ".py" not in err[0] and "UserWarning" not in err[0]
    assert len(err[0]) < 450
    assert warnings.showwarning is not cli._show_warning  # restored after the command


def test_failures_inside_a_command_are_one_line(capsys):
    def run(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x.bin")
    assert cli._run(types.SimpleNamespace(run=run), argparse.Namespace(command="preprocess")) == 2
    assert capsys.readouterr().err == ("pythia-jax preprocess: error: /data/out/x.bin: No space left on device; "
                                       "free some space or choose another --output-prefix\n")


# ------------------------------------------------------------- eval / generate model folders
TINY = ModelConfig(name="tiny", vocab_size=50304, hidden_size=16, num_layers=1, num_heads=2,
                   max_position_embeddings=64)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One HF directory, a folder of HF revisions step0/ step5/, and the README's demo run layout
    (runs/demo/checkpoints with steps 0, 50, 200) next to a tests/data/eval link."""
    from flax import nnx

    from pythia_jax.checkpoint import save_params_checkpoint
    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.model import GPTNeoX, params_to_dict

    root = tmp_path_factory.mktemp("models")
    params = params_to_dict(GPTNeoX(TINY, rngs=nnx.Rngs(0)))
    write_hf_dir(TINY, params, root / "hf", dtype="float32")
    for step in (0, 5):
        write_hf_dir(TINY, params, root / "revisions" / f"step{step}", dtype="float32")
    for step in (0, 50, 200):
        save_params_checkpoint(root / "runs" / "demo" / "checkpoints", step, TINY, params)
    (root / "tests" / "data").mkdir(parents=True)
    os.symlink(os.path.join(REPO, "tests", "data", "eval"), root / "tests" / "data" / "eval")
    return root


def test_one_hf_directory_is_one_checkpoint(models, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert cli.main(["eval", "--checkpoints", str(models / "hf"), "--steps", "all", "--tasks", "piqa",
                     "--data-dir", os.path.join(REPO, "tests", "data", "eval"), "--limit", "2",
                     "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["step"], r["task"]) for r in rows} == {(0, "piqa")}
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoints", str(models / "hf"), "--steps", "5", "--tasks", "piqa",
                     "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "no step 5; available: 0" in capsys.readouterr().err


def test_generate_on_hf_revisions_uses_the_newest(models, capsys):
    assert cli.main(["generate", str(models / "revisions"), "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello")
    assert "using the newest HF revision, step5 (of 0, 5)" in captured.err


def test_generate_and_count_refuse_text_they_would_misread(models, tmp_path, capsys):
    """Bytes that are not UTF-8 in --prompt / --text / --regex (a Latin-1 shell) gave tracebacks,
    or a count that failed after counting; --top-k / --top-p at temperature 0 were ignored; a
    tokenizer file that is not one gave a traceback. Each is now one line, before any work."""
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    for argv in (["generate", str(models / "hf"), "--prompt", latin1],
                 ["count", "--data", "demo", "--text", latin1, "--out", str(tmp_path / "c.csv")],
                 ["count", "--data", "demo", "--regex", latin1, "--out", str(tmp_path / "c.csv")]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert "not UTF-8 text (byte 3)" in capsys.readouterr().err
    (tmp_path / "terms.txt").write_bytes(b"Paris\ncaf\xe9\n")
    assert cli.main(["count", "--data", "demo", "--order", "neox", "--batch-size", "8", "--seq-len", "128",
                     "--train-iters", "4", "--terms-file", str(tmp_path / "terms.txt"),
                     "--out", str(tmp_path / "c.csv")]) == 2
    assert "terms.txt: not UTF-8 text (byte 9); re-encode the file as UTF-8" in capsys.readouterr().err
    assert cli.main(["generate", str(models / "hf"), "--prompt", "Hi", "--top-k", "5"]) == 2
    assert "--temperature 0 (the default) is greedy decoding" in capsys.readouterr().err
    from pythia_jax.data.tokenizer import load_tokenizer
    from pythia_jax.errors import DataError

    (tmp_path / "t.json").write_text('{"a": 1,\n "b"}')
    with pytest.raises(DataError, match="not a tokenizer file of the Hugging Face tokenizers library"):
        load_tokenizer(str(tmp_path / "t.json"))


def test_generate_no_stop_shows_the_document_boundaries(capsys):
    from pythia_jax.data.tokenizer import decode as decode_with_eod  # what generate --no-stop prints
    from pythia_jax.eval.tokens import decode, encode, get_tokenizer

    tok = get_tokenizer()
    ids = encode(tok, "Hello") + [0] + encode(tok, " world")
    assert decode(tok, ids) == "Hello world" and decode_with_eod(ids) == "Hello<|endoftext|> world"


@pytest.mark.slow  # end to end: five tasks at three steps
def test_readme_eval_example_runs_as_written(models, monkeypatch, capsys):
    """The README's zero-shot eval command (on a tiny stand-in of the demo run, --limit 2 added)."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read().replace("\\\n", " ")
    commands = [shlex.split(line.split("#")[0]) for line in readme.splitlines()
                if line.strip().startswith("pythia-jax eval --checkpoints runs/demo/checkpoints --steps 0,50,200")]
    assert commands and "tests/data/eval" in commands[0]
    monkeypatch.chdir(models)
    assert cli.main(commands[0][1:] + ["--limit", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (models / "results.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {0, 50, 200}
    assert {r["task"] for r in rows} == {"piqa", "arc_easy", "arc_challenge", "sciq", "winogrande"}


# ------------------------------------------------------------------------------------ train
@pytest.mark.slow  # end to end: three short training runs
def test_train_reports_unfinished_runs_lost_steps_and_full_disks(tmp_path, monkeypatch, capsys):
    import re

    from pythia_jax.train import metrics

    out = tmp_path / "run"
    argv = ["train", "--gin_file=configs/demo.gin", f"--gin.TrainConfig.output_dir='{out}'",
            "--gin.ModelConfig.hidden_size=16", "--gin.ModelConfig.num_layers=1", "--gin.ModelConfig.num_heads=2",
            "--gin.TrainConfig.num_steps=6", "--gin.TrainConfig.global_batch=2", "--gin.TrainConfig.seq_length=16",
            "--gin.TrainConfig.eval_every=0", "--gin.TrainConfig.export_hf=None", "--gin.TrainConfig.log_every=1",
            "--gin.TrainConfig.checkpoint_log_until=2", "--gin.TrainConfig.checkpoint_every=50",
            "--gin.TrainConfig.progress_bar=False", "--gin.TrainConfig.tensorboard=False"]
    # --max_steps: an unfinished run is not "done"
    assert cli.main(argv + ["--max_steps", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"stopped at step 3 of 6 (--max_steps; checkpoint saved in {out}/checkpoints); "
        "run the same command to continue")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_s"] > 0 and "mfu" not in r for r in rows if "tokens_per_s" in r)  # CPU: no peak

    real_append = metrics.MetricsLog.append

    def interrupt_at_5(self, row):
        if row.get("step") == 5:
            raise KeyboardInterrupt
        real_append(self, row)

    monkeypatch.setattr(metrics.MetricsLog, "append", interrupt_at_5)
    assert cli.main(argv + ["--gin.TrainConfig.progress_bar=True"]) == 130
    err = capsys.readouterr().err
    # the progress bar ends its line first: the report was appended to the bar's line
    assert re.search(r"(?m)^pythia-jax: warning: interrupted at step", err), err
    m = re.search(r"pythia-jax: warning: interrupted at step (\d+): the newest checkpoint is step 3, so (\d+) "
                  r"step\(s\) since it are lost; the same command resumes from step 3", err)
    assert m and int(m.group(1)) - 3 == int(m.group(2)) > 0, err
    assert err.rstrip().endswith("pythia-jax train: interrupted")

    def disk_full(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)

    monkeypatch.setattr(metrics.MetricsLog, "append", disk_full)
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [f"pythia-jax train: error: {out}/metrics.jsonl: No space left on device; free some space or "
                   "choose another --gin.TrainConfig.output_dir"]


def test_console_script_after_ctrl_c_runs_exit_handlers_then_exits_130(tmp_path):
    """After Ctrl-C the console script ends with os._exit(130) once the exit handlers ran and the
    streams were flushed, skipping the interpreter's teardown, which crashed (exit 139) in 4 of 6
    interrupted evals. Checked in a child process: the handler ran, the output came out, 130, and
    the teardown did not run (a module-level object's __del__ would have written to stderr, as it
    does after a plain sys.exit(130))."""
    import subprocess
    import textwrap

    marker = tmp_path / "atexit-ran"
    code = textwrap.dedent(f"""
        import atexit, os, sys
        from pythia_jax import cli, process_env
        process_env.reexec_with_huge_pages = lambda: None
        atexit.register(lambda: open({str(marker)!r}, "w").write("yes"))
        class Teardown:
            def __del__(self, write=os.write):  # bound now: builtins are gone at teardown
                write(2, b" teardown ran")
        keep = Teardown()
        cli.main = lambda: (print("interrupted", file=sys.stderr, end="") or 130)
        cli.entry()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHIA_JAX_HUGEPAGES": "0"})
    assert done.returncode == 130, done.stderr
    assert marker.read_text() == "yes" and done.stderr == "interrupted"
