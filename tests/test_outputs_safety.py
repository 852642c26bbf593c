"""Outputs can never destroy what they replace (issue: never lose a user's work).

* an output that is, contains or lies inside its source is refused (every ``convert`` direction,
  symlinks resolved); ``--overwrite`` replaces only an output of the same kind;
* ``TrainConfig.export_hf`` cannot replace the run, and goes under the run's own folder by default;
* every writer publishes its outputs together or not at all, leaves no temporary behind when it
  fails at any point, and cleans up the leftovers of a killed writer;
* published folders and files get the user's umask; ``convert`` says which step and dtype it wrote.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from pythia_jax import io_utils
from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.errors import PythiaJaxError

TINY = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def params():
    import pythia_jax
    from pythia_jax.model import params_to_dict

    return {k: v for k, v in params_to_dict(pythia_jax.init(TINY, seed=0)).items()}


def _host(params):
    import jax
    return jax.tree.map(np.asarray, params)


def make_run(root: Path, params, steps=(0,)) -> Path:
    """A training run folder: checkpoints/ (this project's format), metrics.jsonl, tensorboard/."""
    from pythia_jax.checkpoint import TrainCheckpointer

    run = root / "run"
    with TrainCheckpointer(run / "checkpoints", save_steps=(), async_save=False, model_config=TINY) as ck:
        for s in steps:
            ck.save(s, params, force=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out").write_text("x")
    return run


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def cli(*argv) -> int:
    from pythia_jax.cli import main
    return main([*map(str, argv)])


# ------------------------------------------------------------ 1. never the source or around it
def test_jax_to_hf_into_the_run_holding_the_source_is_refused(tmp_path, params, capsys):
    """The example of the issue: ``convert jax-to-hf RUN/checkpoints RUN --overwrite``."""
    run = make_run(tmp_path, params)
    before = snapshot(run)
    assert cli("convert", "jax-to-hf", run / "checkpoints", run, "--overwrite", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "contains the input" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert snapshot(run) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("direction,source,output", [
    ("jax-to-hf", "run/checkpoints", "run"),                    # output contains the source
    ("jax-to-hf", "run/checkpoints/0", "run/checkpoints"),      # a step dir: output is its root
    ("jax-to-hf", "run/checkpoints", "run/checkpoints/hf"),     # output inside the source
    ("jax-to-hf", "run/checkpoints", "link_to_run"),            # through a symlink
    ("jax-to-neox", "run/checkpoints", "run"),
    ("hf-to-jax", "hf", "."),                                   # the parent of the HF folder
    ("hf-to-jax", "hf", "hf/ck"),
    ("neox-to-jax", "nx/global_step0", "nx"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_every_direction_refuses_an_output_around_or_inside_its_source(tmp_path, params, capsys,
                                                                       direction, source, output, overwrite):
    from pythia_jax.convert.hf import write_hf_dir

    base = tmp_path / "w"
    base.mkdir()
    make_run(base, params)
    write_hf_dir(TINY, _host(params), base / "hf", dtype="float32")
    (base / "nx" / "global_step0").mkdir(parents=True)
    (base / "nx" / "latest").write_text("global_step0")
    (base / "link_to_run").symlink_to(base / "run")
    before = snapshot(base)
    argv = ["convert", direction, base / source, base / output, "--no-progress"]
    assert cli(*argv, *(["--overwrite"] if overwrite else [])) == 2
    err = capsys.readouterr().err
    assert "the input" in err and "Traceback" not in err
    assert snapshot(base) == before and leftovers(tmp_path) == []


def test_all_steps_root_must_be_new_empty_or_step_folders(tmp_path, params, capsys):
    run = make_run(tmp_path, params)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert cli("convert", "jax-to-hf", run / "checkpoints", other, "--all-steps", "--no-progress") == 2
    assert "a folder of 1 other entries (notes.txt)" in capsys.readouterr().err
    assert cli("convert", "jax-to-hf", run / "checkpoints", tmp_path / "all", "--all-steps", "--no-progress",
               "--dtype", "float32") == 0
    assert io_utils.path_kind(tmp_path / "all") == "steps"
    assert cli("convert", "jax-to-hf", run / "checkpoints", tmp_path / "all", "--all-steps", "--no-progress",
               "--overwrite") == 0  # the same kind is replaced
    assert (other / "notes.txt").read_text() == "keep" and leftovers(tmp_path) == []


def _make_existing(kind: str, path: Path, params) -> None:
    from pythia_jax.convert.hf import write_hf_dir

    if kind == "run":
        (path / "checkpoints").mkdir(parents=True)
        (path / "metrics.jsonl").write_text("{}\n")
    elif kind == "other":
        path.mkdir()
        (path / "thesis.tex").write_text("months of work")
    elif kind == "file":
        path.write_text("a file")
    elif kind == "hf":
        write_hf_dir(TINY, _host(params), path, dtype="float32")
    elif kind == "checkpoint":
        from pythia_jax.commands.convert import write_checkpoint
        write_checkpoint(str(path), 0, TINY, _host(params), None, {}, overwrite=False)


@pytest.mark.parametrize("writing", ["hf", "checkpoint"])
@pytest.mark.parametrize("existing", ["run", "other", "file", "hf", "checkpoint"])
def test_overwrite_replaces_only_the_same_kind(tmp_path, params, writing, existing):
    from pythia_jax.commands.convert import write_checkpoint
    from pythia_jax.convert.hf import write_hf_dir

    out = tmp_path / "out"
    _make_existing(existing, out, params)
    before = snapshot(tmp_path) if out.is_dir() else out.read_bytes()

    def write():
        if writing == "hf":
            write_hf_dir(TINY, _host(params), out, dtype="float32", overwrite=True)
        else:
            write_checkpoint(str(out), 0, TINY, _host(params), None, {}, overwrite=True)

    if existing == writing:
        write()
        assert io_utils.path_kind(out) == writing
    else:
        with pytest.raises(PythiaJaxError, match=r"--overwrite replaces only an output of the same kind"
                                                 r"|not a file or folder|is an unrelated file") as e:
            write()
        assert str(out) in str(e.value) and "\n" not in str(e.value)
        assert (snapshot(tmp_path) if out.is_dir() else out.read_bytes()) == before
    assert leftovers(tmp_path) == []


def test_save_hf_api_refuses_a_run_folder_and_names_what_it_looks_like(tmp_path, params):
    import pythia_jax

    run = make_run(tmp_path, params)
    before = snapshot(run)
    model = pythia_jax.init(TINY, seed=0)
    with pytest.raises(PythiaJaxError, match="is a training run directory"):
        pythia_jax.save_hf(model, run, overwrite=True)
    with pytest.raises(PythiaJaxError, match="contains the input"):
        io_utils.check_output_dir(tmp_path, True, kind="hf", inputs=[run / "checkpoints"])
    assert snapshot(run) == before


@pytest.mark.parametrize("where", ["home", "cwd", "above_cwd"])
def test_home_and_working_folders_are_never_outputs(tmp_path, monkeypatch, where):
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "work")
    target = {"home": home, "cwd": home / "work", "above_cwd": tmp_path}[where]
    with pytest.raises(PythiaJaxError, match="the home folder, the working folder"):
        io_utils.check_output_dir(target, overwrite=True, kind="hf")


# ------------------------------------------------------------------- 2-3. the training export
@pytest.mark.parametrize("export,problem", [
    ("{out}", "is the run's output_dir"),
    ("{parent}", "is above the run's output_dir"),
    (".", "is the run's output_dir"),
    ("..", "is above the run's output_dir"),
    ("checkpoints", "inside the run's checkpoints"),
    ("checkpoints/hf", "inside the run's checkpoints"),
    ("{out}/checkpoints/5", "inside the run's checkpoints"),
    ("tensorboard", "inside the run's tensorboard"),
])
def test_export_hf_that_would_replace_the_run_is_refused_when_read(tmp_path, export, problem):
    from pythia_jax.train.config import TrainConfig

    out = tmp_path / "runs" / "mine"
    export = export.format(out=out, parent=out.parent)
    with pytest.raises(ConfigError, match=problem) as e:
        TrainConfig(output_dir=str(out), export_hf=export)
    assert "\n" not in str(e.value)


def test_export_hf_symlink_to_the_run_is_refused(tmp_path):
    from pythia_jax.train.config import TrainConfig

    (tmp_path / "run").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "run")
    with pytest.raises(ConfigError, match="is the run's output_dir"):
        TrainConfig(output_dir=str(tmp_path / "run"), export_hf=str(tmp_path / "alias"))


def test_demo_export_goes_under_each_runs_own_output_dir(tmp_path):
    """configs/demo.gin exports to ``"hf"``: runs/demo/hf for the demo, <output_dir>/hf otherwise."""
    import gin

    from pythia_jax import gin_setup
    from pythia_jax.train.config import build_train_config

    try:
        gin_setup.parse(["configs/demo.gin"], [])
        demo = build_train_config()
        gin.clear_config()
        gin_setup.parse(["configs/demo.gin"], ["TrainConfig.output_dir = 'runs/mine'"])
        mine = build_train_config()
    finally:
        gin.clear_config()
    assert demo.export_hf_dir == os.path.join("runs/demo", "hf")
    assert mine.export_hf_dir == os.path.join("runs/mine", "hf")
    assert 'TrainConfig.export_hf = "hf"' in Path("configs/demo.gin").read_text()


def test_a_second_run_does_not_touch_the_first_runs_export(tmp_path, params):
    """The export step of two runs with different output_dirs and the same (default) export_hf."""
    from pythia_jax.train.config import TrainConfig
    from pythia_jax.train.loop import export_hf

    first = TrainConfig(model=TINY, output_dir=str(tmp_path / "demo"), export_hf="hf", seq_length=16)
    second = TrainConfig(model=TINY, output_dir=str(tmp_path / "mine"), export_hf="hf", seq_length=16)
    export_hf(first, _host(params), first.export_hf_dir)
    before = snapshot(tmp_path / "demo")
    export_hf(second, _host(params), second.export_hf_dir)
    assert snapshot(tmp_path / "demo") == before
    assert io_utils.path_kind(tmp_path / "mine" / "hf") == "hf"


def test_the_export_replaces_only_an_earlier_export_of_the_same_run(tmp_path, params):
    """An absolute export_hf shared by two runs, or naming an HF folder the run did not write (its
    own init_from source, a Hub revision), was replaced by the final export without a word. The
    export records its run in config.json; a start refuses any other HF directory there."""
    from pythia_jax.config import ConfigError
    from pythia_jax.convert.hf import export_source, write_hf_dir
    from pythia_jax.train.config import TrainConfig
    from pythia_jax.train.loop import export_hf
    from pythia_jax.train.paths import check_export_dir

    shared = str(tmp_path / "exports" / "hf")
    first = TrainConfig(model=TINY, output_dir=str(tmp_path / "a"), export_hf=shared, seq_length=16)
    second = TrainConfig(model=TINY, output_dir=str(tmp_path / "b"), export_hf=shared, seq_length=16)
    check_export_dir(first)  # nothing there yet
    export_hf(first, _host(params), first.export_hf_dir)
    assert export_source(shared) == {"run": str(tmp_path / "a"), "step": first.num_steps}
    from pythia_jax.eval.loading import available_steps
    assert available_steps(shared) == [first.num_steps]  # eval / generate: the step exported (it was 0)
    check_export_dir(first)  # a rerun of the same run may replace its own export
    before = snapshot(tmp_path / "exports")
    with pytest.raises(ConfigError, match=rf"export_hf {shared} holds the export of run {tmp_path / 'a'}; the final "
                                          "export would replace it"):
        check_export_dir(second)
    revision = tmp_path / "revs" / "step20"
    write_hf_dir(TINY, _host(params), revision, dtype="float32")
    source = TrainConfig(model=TINY, output_dir=str(tmp_path / "c"), export_hf=str(revision), seq_length=16,
                         init_from=str(revision), start_step=20, num_steps=40)
    with pytest.raises(ConfigError, match="holds an HF model this run did not export"):
        check_export_dir(source)
    # a path through a folder that does not exist ("missing/..") names the same folder: refused too
    around = TrainConfig(model=TINY, output_dir=str(tmp_path / "e"), seq_length=16,
                         export_hf=str(tmp_path / "missing" / ".." / "revs" / "step20"))
    assert around.export_hf_dir == str(revision)
    with pytest.raises(ConfigError, match="holds an HF model this run did not export"):
        check_export_dir(around)
    relative = TrainConfig(model=TINY, output_dir=str(tmp_path / "f"), seq_length=16, export_hf="../revs/step20")
    with pytest.raises(ConfigError, match="holds an HF model this run did not export"):
        check_export_dir(relative)
    # an export from before exports recorded their run, inside the run's own folder: the run's own
    legacy = TrainConfig(model=TINY, output_dir=str(tmp_path / "g"), export_hf="hf", seq_length=16)
    write_hf_dir(TINY, _host(params), legacy.export_hf_dir, dtype="float32")
    check_export_dir(legacy)
    # the same run reached through a symlink (or moved): still its own export
    os.symlink(tmp_path / "a", tmp_path / "a-link")
    check_export_dir(TrainConfig(model=TINY, output_dir=str(tmp_path / "a-link"), export_hf=shared, seq_length=16))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("x")
    other = TrainConfig(model=TINY, output_dir=str(tmp_path / "d"), export_hf=str(tmp_path / "notes"), seq_length=16)
    with pytest.raises(ConfigError, match=r"export_hf .*notes is a folder .*not an HF directory the export may "
                                          r"replace: choose another TrainConfig.export_hf"):
        check_export_dir(other)
    assert snapshot(tmp_path / "exports") == before


def test_a_full_disk_during_the_export_names_the_export(tmp_path, params, monkeypatch):
    """ENOSPC while writing the export said 'choose another --gin.TrainConfig.output_dir', without a
    path: it now names the export folder and TrainConfig.export_hf."""
    import errno

    from pythia_jax.convert import hf as hfc
    from pythia_jax.errors import PythiaJaxError
    from pythia_jax.train.config import TrainConfig
    from pythia_jax.train.loop import export_hf

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hfc, "write_hf_dir", full)
    cfg = TrainConfig(model=TINY, output_dir=str(tmp_path / "a"), export_hf=str(tmp_path / "x" / "hf"), seq_length=16)
    with pytest.raises(PythiaJaxError, match=rf"exporting the final step to {tmp_path / 'x' / 'hf'}: No space left on "
                                             r"device; free some space or choose another TrainConfig.export_hf"):
        export_hf(cfg, _host(params), cfg.export_hf_dir)


# --------------------------------------------- 6. together or not at all; no temporaries survive
def _write_dataset(tmp_path, version):
    from pythia_jax.data.indexed import write_indexed_dataset
    write_indexed_dataset(str(tmp_path / "ds"), [np.arange(5 + version) % 60, np.arange(3)])


def _write_preshuffled(tmp_path, version):
    from pythia_jax.data.indexed import IndexedDataset, write_indexed_dataset
    from pythia_jax.data.orders import PreshuffledOrder
    from pythia_jax.data.preprocess import write_preshuffled

    if not (tmp_path / "raw.idx").exists():
        write_indexed_dataset(str(tmp_path / "raw"), [np.arange(9) + k for k in range(6)])
    order = PreshuffledOrder(IndexedDataset(str(tmp_path / "raw")), 8)
    write_preshuffled(order, str(tmp_path / "pre"), 3 + version, shards=2, progress=False)


def _write_index_maps(tmp_path, version):
    from pythia_jax.data.indexed import save_npys_together
    save_npys_together([(str(tmp_path / f"m_{k}.npy"), np.arange(4) + version) for k in ("doc", "sample", "shuffle")])


def _write_npy(tmp_path, version):
    from pythia_jax.data.indexed import save_npy_atomic
    save_npy_atomic(str(tmp_path / "rows.npy"), np.full(4, version))


def _write_table(tmp_path, version):
    from pythia_jax.eval.runner import write_csv
    write_csv([{"step": version, "task": "t", "metric": "acc", "value": 0.5, "stderr": 0.1,
                "num_examples": 3}], tmp_path / "results.csv")


def _write_plot(tmp_path, version):
    from pythia_jax.eval.plot import plot_metric
    plot_metric([{"step": s, "task": "t", "metric": "acc", "value": 0.1 * s + version, "stderr": 0.0}
                 for s in (0, 1)], "acc", tmp_path / "acc.png")


def _write_hf(tmp_path, version, params=None):
    from pythia_jax.convert.hf import write_hf_dir
    write_hf_dir(TINY, _host(params), tmp_path / "hf", dtype=("float32", "float16")[version % 2], overwrite=True)


def _write_ckpt(tmp_path, version, params=None):
    from pythia_jax.commands.convert import write_checkpoint
    write_checkpoint(str(tmp_path / "ck"), version, TINY, _host(params), None, {}, overwrite=True)


WRITERS = {"dataset": _write_dataset, "preshuffled": _write_preshuffled, "index_maps": _write_index_maps,
           "npy": _write_npy, "table": _write_table, "plot": _write_plot, "hf": _write_hf,
           "checkpoint": _write_ckpt}


class Injected(Exception):
    pass


@pytest.mark.parametrize("point", ["temp0", "temp1", "write", "interrupt", "rename0", "rename1", "rename2"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_failing_writer_keeps_the_previous_output_and_no_temporaries(tmp_path, monkeypatch, params,
                                                                       writer, point):
    """Fail each writer while it creates its 1st / 2nd temporary, while it writes (an exception or
    a KeyboardInterrupt), or at the 1st / 2nd / 3rd rename of the publication (setting the old
    output aside, after that, between the files of a pair): the previous output is intact and
    nothing hidden stays."""
    import builtins

    fn = WRITERS[writer]
    call = (lambda v: fn(tmp_path, v, params)) if writer in ("hf", "checkpoint") else (lambda v: fn(tmp_path, v))
    call(0)
    before = snapshot(tmp_path)
    real_rename, real_open, real_temp = os.rename, builtins.open, io_utils.temp_sibling
    renames = []

    def rename(a, b, *args, **kw):
        renames.append((a, b))
        if point == f"rename{len(renames) - 1}":
            raise Injected("rename failed (simulated)")
        return real_rename(a, b, *args, **kw)

    def opener(file, mode="r", *args, **kw):
        if "w" in str(mode) and ".tmp-" in os.fspath(file):
            raise (KeyboardInterrupt if point == "interrupt" else Injected)("write failed (simulated)")
        return real_open(file, mode, *args, **kw)

    temps = []

    def temp(final, **kw):
        temps.append(final)
        if point == f"temp{len(temps) - 1}":
            raise Injected("no space for a temporary (simulated)")
        return real_temp(final, **kw)

    if point.startswith("rename"):
        monkeypatch.setattr(io_utils.os, "rename", rename)
    elif point in ("write", "interrupt"):
        monkeypatch.setattr(builtins, "open", opener)
    else:
        monkeypatch.setattr(io_utils.outputs, "temp_sibling", temp)  # where the writers look it up
    from pythia_jax.checkpoint import CheckpointSaveFailed

    try:
        call(1)
    except (Injected, KeyboardInterrupt, CheckpointSaveFailed):  # Orbax's own rename failing is
        failed = True  # reported by the checkpointer as a failed save
    else:
        failed = False
    monkeypatch.undo()
    assert leftovers(tmp_path) == []
    if failed:
        assert snapshot(tmp_path) == before
    else:  # this point is not reached by this writer (a single file has no 2nd temporary)
        assert point in ("temp1", "rename2") and snapshot(tmp_path) != before


def test_failure_during_an_orbax_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, params):
    from pythia_jax import checkpoint

    _write_ckpt(tmp_path, 0, params)
    before = snapshot(tmp_path)

    def failing(*a, **k):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(checkpoint.TrainCheckpointer, "save", failing)
    with pytest.raises(OSError):
        _write_ckpt(tmp_path, 1, params)
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_leftovers_of_a_killed_writer_are_removed_with_a_warning(tmp_path, caplog):
    from pythia_jax.data.indexed import save_npy_atomic

    host = socket.gethostname()
    final = tmp_path / "rows.npy"
    dead = tmp_path / f".rows.npy.tmp-999999999@{host}-0123abcd"  # no such process
    live = tmp_path / f".rows.npy.tmp-{os.getpid()}@{host}-4567abcd"  # a writer still at work
    remote_old = tmp_path / ".rows.npy.tmp-12@other-host-89abcdef"
    remote_new = tmp_path / ".rows.npy.tmp-13@other-host-fedcba98"
    unrelated = tmp_path / f".other.npy.tmp-999999999@{host}-0123abcd"
    for p in (dead, live, remote_old, remote_new, unrelated):
        p.write_bytes(b"partial")
    old = time.time() - io_utils.STALE_REMOTE_SECONDS - 60
    os.utime(remote_old, (old, old))
    with caplog.at_level(logging.WARNING, logger="pythia_jax.io_utils"):
        save_npy_atomic(str(final), np.arange(3))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([final.name, live.name, remote_new.name, unrelated.name])
    assert sum("left by a writer that was killed" in r.getMessage() for r in caplog.records) == 2


def test_a_set_aside_output_of_a_killed_publication_is_put_back(tmp_path, caplog):
    host = socket.gethostname()
    aside = tmp_path / f".hf.old-999999999@{host}-0123abcd"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="pythia_jax.io_utils"):
        io_utils.clean_stale_temps(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").exists() and not aside.exists()
    assert "restoring" in caplog.text


# --------------------------------------------------------------------------- 10. modes, messages
@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640),
                                                       (0o002, 0o775, 0o664)])
def test_published_outputs_get_the_users_umask(tmp_path, params, umask, dir_mode, file_mode):
    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.data.indexed import save_npy_atomic

    previous = os.umask(umask)
    try:
        write_hf_dir(TINY, _host(params), tmp_path / "hf", dtype="float32")
        save_npy_atomic(str(tmp_path / "a.npy"), np.arange(3))
    finally:
        os.umask(previous)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "hf" / "config.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "a.npy").stat().st_mode & 0o777 == file_mode


def test_convert_without_step_says_which_step_and_dtype_and_why_it_fell_back(tmp_path, params, capsys, caplog):
    import shutil

    run = make_run(tmp_path, params, steps=(0, 2))
    shutil.rmtree(run / "checkpoints" / "2" / "metadata")  # the newest step is damaged
    with caplog.at_level(logging.WARNING):
        assert cli("convert", "jax-to-hf", run / "checkpoints", tmp_path / "hf", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "(step 0, float16; newest step 2 skipped: missing file" in out
    assert any("checkpoint step 2" in r.getMessage() and "falling back" in r.getMessage()
               for r in caplog.records)
    assert cli("convert", "jax-to-hf", run / "checkpoints", tmp_path / "hf32", "--step", "0",
               "--dtype", "float32", "--no-progress") == 0
    assert "(step 0, float32)" in capsys.readouterr().out


def test_a_failed_model_config_sidecar_write_leaves_no_temporary(tmp_path, monkeypatch):
    """``<checkpoints>/model_config.json`` of a training run is written beside the steps."""
    from etils import epath

    from pythia_jax import checkpoint

    real = epath.Path.write_text

    def failing(self, *a, **k):
        real(self, "{partial", *a[1:], **k)
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(epath.Path, "write_text", failing)
    with pytest.raises(OSError):
        checkpoint.write_model_config(tmp_path, TINY)
    assert os.listdir(tmp_path) == []


def test_publishing_never_replaces_a_folder_with_a_file(tmp_path):
    """The last line of defence for every file writer: a final path that is a folder is refused
    before anything is renamed, and the temporary is removed."""
    from pythia_jax.errors import PythiaJaxError

    out = tmp_path / "scratch"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(PythiaJaxError, match=rf"^output {re.escape(str(out))} is a folder; refusing to replace "
                                             "it with a file: choose another output path$"):
        io_utils.write_text_atomic(out, "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch"]
    assert (out / "mine.txt").read_text() == "keep"


def test_a_failed_output_leaves_no_folder_it_created(tmp_path):
    """atomic_files: a write that fails removes the folders made for it while they are empty (a
    full disk left an empty new/sub/ behind); a folder that existed, or that something else wrote
    into meanwhile, stays."""
    (tmp_path / "old").mkdir()
    for final in (tmp_path / "new" / "sub" / "x.npy", tmp_path / "old" / "y.npy"):
        with pytest.raises(OSError):
            with io_utils.atomic_files(final):
                raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and not list((tmp_path / "old").iterdir())
    with pytest.raises(OSError):
        with io_utils.atomic_files(tmp_path / "new" / "sub" / "x.npy"):
            (tmp_path / "new" / "notes.txt").write_text("mine")
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["notes.txt"]
