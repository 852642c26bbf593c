"""Evaluate many checkpoints of a run and write one tidy table (step, task, metric, value, stderr).

Tasks:

- lm-evaluation-harness's own tasks on local files (``pythia_jax.eval.harness``): ``piqa``,
  ``arc_easy``, ``arc_challenge``, ``sciq``, ``winogrande``, ``lambada_openai``, ``logiqa``, ``wsc``,
  ``crows_pairs``, ``crows_pairs_gender`` (needs the ``lm_eval`` extra). Without lm_eval (or with
  ``task_system="native"``) the first five run on the bundled YAML specs (``tasks.py``), which
  reproduce the harness's prompts; the others then refuse with an install hint. Any other
  zero-shot spec .yaml path runs natively.
- ``winobias`` (native, ``pythia_jax.eval.winobias``): generation + exact match, net bias.
- the generation tasks of ``pythia_jax.eval.generation_tasks`` (``arithmetic``, ``arithmetic_plus``,
  ``arithmetic_times``, ``triviaqa``: one table task per k of ``shots``, e.g. ``arithmetic_plus_k4``).
- ``perplexity`` (rolling log-likelihood of an indexed dataset or JSONL) and ``memorization``
  (32-token prompts of the training rows each checkpoint has seen).
- Groups: ``paper`` (the Pythia paper's zero-shot suite: ``PAPER_TASKS``, plus ``wsc`` when
  ``<data_dir>/wsc.jsonl`` exists) and ``bias`` (``BIAS_TASKS``).

The table is JSON lines
(``.jsonl``) or CSV (``.csv``), written after every (step, task) so an interrupted run loses at
most one task. Each row records what it was computed from (``checkpoint``, ``weights``,
``settings``: ``pythia_jax.eval.provenance``); rerunning skips the (step, task) pairs already in
the file, and a file (or details folder) holding results of other checkpoints, weights or
settings is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pythia_jax.errors import CheckpointError, DataError, PythiaJaxError
from pythia_jax.eval.provenance import ID_COLUMNS, DetailsLedger, check_records
from pythia_jax.io_utils import atomic_files, check_output_file

logger = logging.getLogger(__name__)

COLUMNS = ("step", "task", "metric", "value", "stderr", "num_examples") + ID_COLUMNS
DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "sciq", "winogrande")
SPECIAL_TASKS = ("perplexity", "memorization")
PAPER_TASKS = ("lambada_openai", "piqa", "winogrande", "arc_easy", "arc_challenge", "sciq", "logiqa")
BIAS_TASKS = ("winobias", "crows_pairs_gender")
TASK_GROUPS = {"paper": PAPER_TASKS, "bias": BIAS_TASKS}
TASK_SYSTEMS = ("auto", "harness", "native")


@dataclasses.dataclass
class EvalSettings:
    """Everything the runner needs besides the checkpoints and steps."""

    tasks: Sequence[str] = DEFAULT_TASKS
    data_dir: str | None = None  # JSONL files of the zero-shot tasks
    limit: int | None = None  # first N examples / documents per task
    batch_size: int = 16
    max_len: int | None = None
    ppl_data: str | None = None  # indexed-dataset prefix or .jsonl
    ppl_text_key: str = "text"
    # memorization: the run's data settings come from the checkpoints' run record; these are
    # checked against it, or all required when the checkpoints hold none (checkpoint.resolve_run_data)
    mem_data: str | None = None  # indexed-dataset prefix of the training data
    mem_order: str | None = None
    mem_seq_len: int | None = None
    mem_rows_per_step: int | None = None  # the run's global batch
    mem_order_seed: int | None = None  # GPT-NeoX order seed
    mem_train_iters: int | None = None  # steps the GPT-NeoX index maps were built for
    mem_sample: int | None = None  # score a random sample of the seen rows (None: all of them)
    mem_seed: int = 0  # the sample's seed
    mem_chunk_rows: int = 65536  # rows per resumable part file
    num_hosts: int = 1  # memorization chunks split over hosts by index
    host_index: int = 0
    details_dir: str | None = None  # per-example / per-row outputs
    stack: int = 1  # score K checkpoints at a time in one compiled pass (pythia_jax.eval.stacked)
    max_stack_bytes: int | None = None  # memory budget for the stack (default: the device's)
    shots: Sequence[int] | None = None  # k of the few-shot generation tasks (None: each task's default)
    progress: bool = True
    task_system: str = "auto"  # harness tasks: "auto" (harness if installed), "harness", "native"
    datasets_cache: str | None = None  # Arrow copies of the local files (default: datasets' cache)
    bootstrap_iters: int = 100000  # harness's bootstrapped stderrs (perplexity); 0: no stderrs at all
    winobias_split: str = "dev"
    winobias_max_new_tokens: int = 32


# --------------------------------------------------------------------------------- the table
def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a results table (JSONL or CSV); a missing file gives []."""
    path = Path(path)
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for lineno, r in enumerate(csv.DictReader(f), 2):
                try:
                    rows.append(_typed_row(r))
                except (KeyError, ValueError) as e:
                    raise DataError(f"{path}:{lineno}: bad results row ({e})") from None
        return rows
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(_typed_row(json.loads(line)))
            except (json.JSONDecodeError, KeyError, ValueError) as e:
                if lineno > 1 and not line.endswith("\n"):
                    break  # a last line cut short by an interruption: ignore it
                raise DataError(f"{path}:{lineno}: bad results row ({e})") from None
    return rows


def _typed_row(r: dict) -> dict[str, Any]:
    """A row with its types; the identity columns are None in rows written before they existed."""
    def num(x):
        if x is None or x == "":
            return float("nan")
        return float(x)

    settings = r.get("settings") or None
    if isinstance(settings, str):  # CSV: JSON text
        settings = json.loads(settings)
    if settings is not None and not isinstance(settings, dict):
        raise ValueError(f"settings {settings!r} is not a mapping")
    return {"step": int(r["step"]), "task": str(r["task"]), "metric": str(r["metric"]),
            "value": num(r["value"]), "stderr": num(r.get("stderr")),
            "num_examples": int(r["num_examples"]) if r.get("num_examples") not in (None, "") else 0,
            "checkpoint": r.get("checkpoint") or None, "weights": r.get("weights") or None,
            "settings": settings}


def _json_value(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def _csv_value(x: Any) -> Any:
    if isinstance(x, dict):
        return json.dumps(x, sort_keys=True)
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else x


class ResultsTable:
    """The output table; ``done`` holds the (step, task) pairs it already has. ``check`` refuses
    a table holding results of other checkpoints, weights or settings (before any work)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.suffix not in (".jsonl", ".csv"):
            raise PythiaJaxError(f"--out must end in .jsonl or .csv, got {self.path}")
        check_output_file(self.path, "table")  # extends a results table, never another file
        self.rows = read_table(self.path)
        self.done = {(r["step"], r["task"]) for r in self.rows}
        # a partial last line left by an interruption is dropped before the first row is added
        # (not before: a table that is then refused stays as it is)
        self._partial = self.path.suffix == ".jsonl" and _ends_unfinished(self.path)

    def check(self, source: str, expected: dict[tuple[int, str], tuple[str, dict]]) -> None:
        """``provenance.check_records`` on the rows already here (``ProvenanceError``)."""
        check_records(self.rows, where=str(self.path), source=source, expected=expected,
                      fix="write these results to another --out")

    def add(self, rows: Iterable[dict[str, Any]], identity: dict[str, Any] | None = None) -> None:
        """Append ``rows``, each with ``identity`` (``checkpoint``, ``weights``, ``settings``)."""
        rows = [_typed_row({**r, **(identity or {})}) for r in rows]
        if self._partial:
            self._rewrite()
            self._partial = False
        self.rows.extend(rows)
        self.done.update((r["step"], r["task"]) for r in rows)
        if self.path.suffix == ".jsonl":
            with open(self.path, "a", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps({k: _json_value(r[k]) for k in COLUMNS}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        else:
            self._rewrite()

    def _rewrite(self) -> None:
        if self.path.suffix == ".csv":
            write_csv(self.rows, self.path)
            return
        with atomic_files(self.path) as (tmp,), open(tmp, "w", encoding="utf-8") as f:
            for r in self.rows:
                f.write(json.dumps({k: _json_value(r[k]) for k in COLUMNS}) + "\n")


def _ends_unfinished(path: Path) -> bool:
    """True when a non-empty file does not end with a newline."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write ``rows`` as a CSV table (atomically; replaces only a results table)."""
    check_output_file(path, "table")
    with atomic_files(path) as (tmp,), open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})


def check_csv_export(path: str | os.PathLike, table: str | os.PathLike) -> None:
    """``eval --csv``: a ``.csv`` path that may receive the export of the results table ``table``.

    An existing file there is replaced only when it is an earlier export of that table: every
    row it holds (step, task, metric and identity) is in ``table``. Anything else (another run's
    results, rows of tasks this table lacks, a JSONL table, any other file) is refused in one line
    (``PythiaJaxError``), before any evaluation: the export would have replaced it without a word.
    """
    path = Path(path)
    if path.suffix != ".csv":
        raise PythiaJaxError(f"--csv must end in .csv, got {path}")
    check_output_file(path, "table", inputs=[table])
    if not path.exists():
        return
    ours = {_row_key(r) for r in read_table(table)}
    foreign = [r for r in read_table(path) if _row_key(r) not in ours]
    if foreign:
        r = foreign[0]
        raise PythiaJaxError(
            f"--csv {path} holds {len(foreign)} rows that are not in --out {table} (e.g. step {r['step']} "
            f"{r['task']} {r['metric']} of {r['checkpoint'] or 'unrecorded checkpoints'}), so it is not an export of "
            "this table and the export would replace them: choose another --csv")


def _row_key(r: dict[str, Any]) -> tuple:
    """What identifies a results row across its JSONL and CSV forms (not its value)."""
    return (r["step"], r["task"], r["metric"], r["checkpoint"], r["weights"],
            json.dumps(r["settings"], sort_keys=True))


# --------------------------------------------------------------------------------- evaluation
def parse_steps(text: str, available: Callable[[], list[int]]) -> list[int]:
    """``"0,1000,2000"``, ``"all"`` or ``"1000-5000"`` (every available step in the range)."""
    text = text.strip()
    if text == "all":
        return available()
    steps: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                steps.extend(s for s in available() if lo <= s <= hi)
            else:
                steps.append(int(part))
        except ValueError:
            raise PythiaJaxError(f"bad --steps entry {part!r}; use e.g. 0,1000,2000 or all") from None
    return sorted(dict.fromkeys(steps))


def expand_tasks(tasks: Sequence[str], data_dir: str | None = None) -> list[str]:
    """Group names expanded (``paper``, ``bias``), harness aliases resolved, duplicates dropped.
    ``paper`` adds ``wsc`` when ``<data_dir>/wsc.jsonl`` exists."""
    from pythia_jax.eval.harness import canonical_name

    out: list[str] = []
    for name in tasks:
        if name in TASK_GROUPS:
            out.extend(TASK_GROUPS[name])
            if name == "paper" and data_dir and (Path(data_dir) / "wsc.jsonl").is_file():
                out.append("wsc")
        else:
            out.append(canonical_name(name) or name)
    return list(dict.fromkeys(out))


def check_tasks(tasks: Sequence[str], settings: EvalSettings) -> dict[str, Any]:
    """Resolve task names before any model is loaded: harness tasks built on their local files,
    zero-shot specs with their examples, WinoBias sentences, the generation tasks (one per k of
    ``settings.shots``) and the special tasks with their data.
    Raises DataError / PythiaJaxError on a problem."""
    from pythia_jax.eval import generation_tasks
    from pythia_jax.eval import harness as H
    from pythia_jax.eval import tasks as T

    if settings.task_system not in TASK_SYSTEMS:
        raise PythiaJaxError(f"task system must be one of {TASK_SYSTEMS}, got {settings.task_system!r}")
    have_harness = H.lm_eval_available()
    if settings.task_system == "harness":
        H.require_lm_eval("--task-system harness")
    resolved: dict[str, Any] = {}
    for name in expand_tasks(tasks, settings.data_dir):
        if name == "perplexity":
            if not settings.ppl_data:
                raise PythiaJaxError("task 'perplexity' needs --ppl-data (indexed-dataset prefix or .jsonl)")
            resolved[name] = None
        elif name == "memorization":
            resolved[name] = None  # the run's rows: resolved per step from the checkpoints
        elif name == "winobias":
            from pythia_jax.eval.winobias import load_winobias
            if settings.data_dir is None:
                raise DataError("task winobias: no data directory given (--data-dir with winobias/)")
            resolved[name] = load_winobias(Path(settings.data_dir) / "winobias", settings.winobias_split,
                                           limit=settings.limit)
        elif name in H.HARNESS_TASKS:
            native = name in T.available_tasks() and (
                settings.task_system == "native" or (settings.task_system == "auto" and not have_harness))
            if native:
                if settings.task_system == "auto":
                    logger.info("lm_eval not installed: task %s runs on the bundled YAML spec", name)
                spec = T.load_spec(name)
                resolved[name] = (spec, T.load_examples(spec, settings.data_dir, limit=settings.limit))
            else:
                if settings.task_system == "native":
                    raise PythiaJaxError(f"task {name!r} has no native implementation; it runs on "
                                         f"lm-evaluation-harness (drop --task-system native)")
                H.require_lm_eval(f"task {name!r}")
                resolved[name] = H.build_task(name, H.default_file(name, settings.data_dir),
                                              cache_dir=settings.datasets_cache)
        elif (gen := generation_tasks.resolve(name, data_dir=settings.data_dir, shots=settings.shots,
                                              limit=settings.limit)) is not None:
            resolved.update(gen)
        else:
            if not Path(name).suffix:  # a name, not a spec file: none of the tasks eval knows
                raise PythiaJaxError(f"unknown task {name!r}; eval accepts: {', '.join(accepted_task_names())}; "
                                     f"or a zero-shot task spec .yaml path")
            spec = T.load_spec(name)
            resolved[spec.name] = (spec, T.load_examples(spec, settings.data_dir, limit=settings.limit))
    return resolved


def accepted_task_names() -> list[str]:
    """Every task name ``--tasks`` accepts (patterns written with <N>), the groups last."""
    from pythia_jax.eval import arithmetic
    from pythia_jax.eval import harness as H
    from pythia_jax.eval import tasks as T

    names = dict.fromkeys([*H.HARNESS_TASKS, *sorted(H.ALIASES), *T.available_tasks(), "winobias",
                           "arithmetic", "arithmetic_k<N>", *(f"arithmetic_{op}" for op in arithmetic.OPERATIONS),
                           *(f"arithmetic_{op}_k<N>" for op in arithmetic.OPERATIONS),
                           "triviaqa", "triviaqa_k<N>", *SPECIAL_TASKS])
    return [*names, *(f"{g} (= {','.join(TASK_GROUPS[g])})" for g in TASK_GROUPS)]


def evaluate_checkpoints(checkpoints: str | os.PathLike, steps: Sequence[int], settings: EvalSettings,
                         out: str | os.PathLike, log: Callable[[str], None] = print) -> ResultsTable:
    """Evaluate ``settings.tasks`` at every step and append the rows to the table ``out``.

    ``checkpoints``: a checkpoint directory (or a run directory: its ``checkpoints/``), HF
    revisions or one HF directory. Every requested step is checked to exist, and the table and
    details folder to hold nothing of another origin, before any evaluation starts.
    """
    from pythia_jax.eval.loading import (
        NO_CHECKPOINTS,
        available_steps,
        checkpoint_source,
        load_model_params,
        weights_fingerprint,
    )
    from pythia_jax.eval.provenance import task_settings

    table = ResultsTable(out)
    have = available_steps(checkpoints)
    if not have:
        raise CheckpointError(f"{checkpoints} holds no checkpoints: it {NO_CHECKPOINTS}")
    missing = [s for s in steps if s not in have]
    if missing:
        raise CheckpointError(f"{checkpoints}: no step {', '.join(map(str, missing))}; available: "
                              f"{', '.join(map(str, have))}")
    tasks = check_tasks(settings.tasks, settings)
    env = _Env(settings, checkpoints)
    if "memorization" in tasks:  # the run's rows for every step, checked before any model loads
        for s in steps:
            env.run_data(s)
    # what each result is computed from; results of anything else in the table are refused
    source = checkpoint_source(checkpoints)
    env.weights = {s: weights_fingerprint(checkpoints, s) for s in steps}
    shared = {t: task_settings(t, r, settings) for t, r in tasks.items()}
    identity = {(s, t): {"checkpoint": source, "weights": env.weights[s],
                         "settings": {**shared[t], "rows": env.run_data(s).fingerprint()}
                         if t == "memorization" else shared[t]}
                for s in steps for t in tasks}
    expected = {k: (v["weights"], v["settings"]) for k, v in identity.items()}
    table.check(source, expected)
    ledger = DetailsLedger(settings.details_dir) if settings.details_dir else None
    if ledger is not None:
        ledger.check(source=source, expected=expected)

    def record(step: int, task: str, rows: list[dict[str, Any]], how: str = "") -> None:
        if ledger is not None:
            ledger.add(env.take_written(), step, task, identity[(step, task)])
        table.add(rows, identity[(step, task)])
        summary = ", ".join(f"{r['metric']}={r['value']:.4g}" for r in rows)
        log(f"step {step} {task}{how}: {summary or 'this host is done; the result comes with the merge'}")

    todo = [(s, t) for s in steps for t in tasks if (s, t) not in table.done]
    skipped = len(steps) * len(tasks) - len(todo)
    if skipped:
        log(f"resuming: {skipped} (step, task) results of these checkpoints and settings already in {out}")
    pending = [s for s in steps if any((s, t) not in table.done for t in tasks)]
    if settings.stack > 1 and pending:
        _evaluate_stacked(checkpoints, pending, tasks, settings, env, table, log, record)
        pending = [s for s in steps if any((s, t) not in table.done for t in tasks)]
    for step in pending:
        step_tasks = [t for t in tasks if (step, t) not in table.done]
        config, params = load_model_params(checkpoints, step)
        env.set_model(config, params)
        for task in step_tasks:
            record(step, task, env.run(step, task, tasks[task]))
    return table


def _evaluate_stacked(checkpoints, steps, tasks, settings, env, table, log, record) -> None:
    """``--stack K``: the scoring tasks (zero-shot, perplexity) of K steps at a time in one compiled
    pass (``pythia_jax.eval.stacked``); K is capped to fit the device memory / ``max_stack_bytes``.
    Memorization, generation, harness and WinoBias tasks stay per step. Groups whose configs
    differ fall back to per step."""
    from pythia_jax.eval.loading import load_model_params
    from pythia_jax.eval.scoring import MAX_BATCH_TOKENS
    from pythia_jax.eval.stacked import StackedScorer, choose_stack

    scoring = [t for t, r in tasks.items()  # perplexity and native zero-shot (spec, examples) tasks
               if t == "perplexity" or (t != "memorization" and isinstance(r, tuple))]
    todo = [s for s in steps if any((s, t) not in table.done for t in scoring)]
    if not todo:
        return
    first_config, _ = load_model_params(checkpoints, todo[0])
    # the padded tokens of the largest batch the scorer sends: batch_size rows of the longest
    # length, but never more than its token cap (long buckets use fewer rows) or one row
    longest = settings.max_len or first_config.max_position_embeddings
    batch_tokens = min(settings.batch_size * longest, max(MAX_BATCH_TOKENS, longest))
    k = choose_stack(first_config, settings.stack, max_bytes=settings.max_stack_bytes,
                     batch_tokens=batch_tokens)  # logs K and the estimate
    stacked = None
    for g in range(0, len(todo), k):
        group = todo[g:g + k]
        loaded = [load_model_params(checkpoints, s) for s in group]
        if len(group) < 2 or any(c.replace(name=loaded[0][0].name) != loaded[0][0] for c, _ in loaded):
            continue  # a lone step or mixed architectures: evaluated one by one afterwards
        params = [p for _, p in loaded]
        if stacked is not None and stacked.num_models == len(group) and stacked.config == loaded[0][0]:
            stacked.replace_params(params)
        else:
            stacked = StackedScorer(params, loaded[0][0], batch_size=settings.batch_size, max_len=settings.max_len)
        for task in scoring:  # task-major: the first view scores all K, the others read its result
            for i, step in enumerate(group):
                if (step, task) in table.done:
                    continue
                env.scorer = stacked.view(i)
                record(step, task, env.run(step, task, tasks[task]), " (stacked)")
    env.placed = env.scorer = None  # the per-step loop places its own model


class _Env:
    """The model of the current step plus the reusable scorer / generator / data."""

    def __init__(self, settings: EvalSettings, checkpoints: str | os.PathLike | None = None):
        self.settings = settings
        self.checkpoints = checkpoints
        self._run_data: dict[int, Any] = {}
        self.placed = None
        self.scorer = None
        self.generator = None
        self._tokenizer = None
        self._ppl = None
        self._order = None
        self.weights: dict[int, str] = {}  # step -> weights_fingerprint (the memorization parts name it)
        self._written: list[Path] = []  # details files written since take_written

    def set_model(self, config, params) -> None:
        from pythia_jax.eval.generate import Generator
        from pythia_jax.eval.runtime import place_model
        from pythia_jax.eval.scoring import Scorer

        if self.placed is not None and config.replace(name=self.placed.config.name) == self.placed.config:
            self.placed.replace_params(params, config)
            return
        self.placed = place_model(params, config=config)
        self.scorer = Scorer(self.placed, batch_size=self.settings.batch_size, max_len=self.settings.max_len)
        self.generator = Generator(self.placed, batch_size=max(self.settings.batch_size, 32))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from pythia_jax.eval.tokens import get_tokenizer
            self._tokenizer = get_tokenizer()
        return self._tokenizer

    def _details(self, step: int, task: str, suffix: str) -> Path | None:
        if not self.settings.details_dir:
            return None
        d = Path(self.settings.details_dir)
        d.mkdir(parents=True, exist_ok=True)
        self._written.append(d / f"step{step}_{task}{suffix}")
        return self._written[-1]

    def take_written(self) -> list[Path]:
        """The details files written since the last call (for the details folder's ledger)."""
        written, self._written = [p for p in self._written if p.exists()], []
        return written

    def run(self, step: int, task: str, resolved: Any) -> list[dict[str, Any]]:
        if task == "perplexity":
            return self._perplexity(step)
        if task == "memorization":
            return self._memorization(step)
        if task == "winobias":
            return self._winobias(step, resolved)
        from pythia_jax.eval import generation_tasks
        if isinstance(resolved, generation_tasks.TASK_TYPES):
            return generation_tasks.run(self.generator, self.tokenizer, step, resolved,
                                        self._details(step, task, ".jsonl"))
        if not isinstance(resolved, tuple):
            return self._harness(step, task, resolved)
        from pythia_jax.eval.zero_shot import evaluate_task

        spec, examples = resolved
        res = evaluate_task(self.scorer, self.tokenizer, spec, examples, progress=self.settings.progress)
        return self._task_rows(step, task, res, res.truncated)

    def _harness(self, step: int, task: str, harness_task: Any) -> list[dict[str, Any]]:
        from pythia_jax.eval.harness import evaluate_task
        from pythia_jax.eval.lm_eval_adapter import PythiaJaxLM

        lm = PythiaJaxLM(scorer=self.scorer, generator=self.generator, progress=self.settings.progress)
        res = evaluate_task(lm, harness_task, limit=self.settings.limit,
                            bootstrap_iters=self.settings.bootstrap_iters)
        return self._task_rows(step, task, res, lm.truncated)

    def _task_rows(self, step: int, task: str, res: Any, truncated: float) -> list[dict[str, Any]]:
        """Result rows of a scored task (its metrics plus ``truncated``); per-example details
        written when asked for."""
        path = self._details(step, task, ".jsonl")
        if path is not None:
            _write_jsonl(path, res.per_example)
        rows = [_row(step, task, m, v, se, res.num_examples) for m, (v, se) in res.metrics.items()]
        rows.append(_row(step, task, "truncated", float(truncated), float("nan"), res.num_examples))
        return rows

    def _winobias(self, step: int, sets: Any) -> list[dict[str, Any]]:
        from pythia_jax.eval.winobias import evaluate_winobias

        res = evaluate_winobias(self.generator, self.tokenizer, sets,
                                max_new_tokens=self.settings.winobias_max_new_tokens)
        path = self._details(step, "winobias", ".jsonl")
        if path is not None:
            _write_jsonl(path, res.per_example)
        rows = [_row(step, "winobias", m, v, se, res.metric_examples.get(m, res.num_examples))
                for m, (v, se) in res.metrics.items()]
        rows.append(_row(step, "winobias", "truncated", float(res.truncated), float("nan"), res.num_examples))
        return rows

    def _perplexity(self, step: int) -> list[dict[str, Any]]:
        from pythia_jax.eval import perplexity as ppl
        from pythia_jax.eval.tokens import encode

        s = self.settings
        if self._ppl is None:
            if s.ppl_data.endswith(".jsonl"):
                texts = ppl.texts_from_jsonl(s.ppl_data, s.ppl_text_key, limit=s.limit)
                self._ppl = ([encode(self.tokenizer, t) for t in texts], texts)
            else:
                self._ppl = (ppl.documents_from_indexed(s.ppl_data, limit=s.limit), None)
        docs, texts = self._ppl
        metrics, per_doc = ppl.evaluate_perplexity(self.scorer, docs, texts, progress=s.progress)
        path = self._details(step, "perplexity", ".jsonl")
        if path is not None:
            _write_jsonl(path, per_doc)
        return [_row(step, "perplexity", m, v, se, len(docs)) for m, (v, se) in metrics.items()]

    def run_data(self, step: int):
        """The ``RunData`` of the rows checkpoint ``step`` has seen (recorded, or all flags)."""
        from pythia_jax.checkpoint import resolve_run_data

        if step not in self._run_data:
            s = self.settings
            self._run_data[step] = resolve_run_data(
                self.checkpoints, step, what=MEM_FLAGS, data=s.mem_data, order=s.mem_order,
                seq_len=s.mem_seq_len, global_batch=s.mem_rows_per_step, seed=s.mem_order_seed,
                train_iters=s.mem_train_iters)
        return self._run_data[step]

    def _memorization(self, step: int) -> list[dict[str, Any]]:
        from pythia_jax.eval.memorization import sweep_memorization

        s = self.settings
        run = self.run_data(step)
        key = json.dumps(run.fingerprint(), sort_keys=True) + run.prefix()
        if self._order is None or self._order[0] != key:
            self._order = (key, run.open_order())
        if not s.details_dir:  # no folder for the resumable parts: in memory, single host
            from pythia_jax.eval.memorization import evaluate_memorization
            res = evaluate_memorization(self.generator, self._order[1], step, batch_size=run.global_batch,
                                        sample=s.mem_sample, seed=s.mem_seed, run=run)
        else:
            res = sweep_memorization(self.generator, run, step, s.details_dir, order=self._order[1],
                                     sample=s.mem_sample, sample_seed=s.mem_seed,
                                     chunk_rows=s.mem_chunk_rows, num_hosts=s.num_hosts,
                                     host_index=s.host_index, progress=s.progress,
                                     weights=self.weights.get(step))
            if res is not None:
                from pythia_jax.eval.memorization import merged_path
                self._written.append(Path(merged_path(s.details_dir, step)))
        if res is None:  # other hosts' chunks are missing: no summary row yet
            return []
        n = len(res.per_row)
        return [_row(step, "memorization", m, v, se, n) for m, (v, se) in res.summary().items()]


MEM_FLAGS = {"data": "--mem-data", "order": "--mem-order", "seq_len": "--mem-seq-len",
             "global_batch": "--mem-rows-per-step", "seed": "--mem-order-seed",
             "train_iters": "--mem-train-iters"}


def _row(step, task, metric, value, stderr, n) -> dict[str, Any]:
    return {"step": int(step), "task": task, "metric": metric, "value": float(value),
            "stderr": float(stderr), "num_examples": int(n)}


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with atomic_files(path) as (tmp,), open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
