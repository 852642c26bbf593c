"""lm-evaluation-harness's own task definitions, run on local data files through ``PythiaJaxLM``.

The Pythia paper's numbers come from lm-evaluation-harness, so every task the harness defines is
run from the harness's bundled task YAML (prompt, choices, ``process_results``, metrics and their
aggregation are the harness's, unchanged). Only where the documents come from is replaced: the
task reads a local JSONL/CSV file (``dataset_path`` ``json``/``csv`` + ``data_files``) instead of
the dataset hub. Where a local file names a field differently from the hub copy the harness was
written for, the field is renamed on load (``process_docs``), e.g. LogiQA's ``query`` ->
``question``.

Tasks (our name: harness task, default file under ``--data-dir``):

========================  ==========================  ===========================
``piqa``                  ``piqa``                    ``piqa.jsonl``
``arc_easy``              ``arc_easy``                ``arc_easy.jsonl``
``arc_challenge``         ``arc_challenge``           ``arc_challenge.jsonl``
``sciq``                  ``sciq``                    ``sciq.jsonl``
``winogrande``            ``winogrande``              ``winogrande.jsonl``
``lambada_openai``        ``lambada_openai``          ``lambada_openai.jsonl``
``logiqa``                ``logiqa``                  ``logiqa.jsonl``
``wsc``                   ``wsc`` (SuperGLUE)         ``wsc.jsonl``
``crows_pairs``           ``crows_pairs_english``     ``crows_pairs_anonymized.csv``
``crows_pairs_gender``    ``crows_pairs_english_gender``  ``crows_pairs_anonymized.csv``
========================  ==========================  ===========================

The harness names are accepted as aliases. Requires the optional extra ``lm_eval``
(``pip install 'pythia-jax[lm_eval]'``); importing this module does not import lm_eval.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pythia_jax.errors import DataError, PythiaJaxError
from pythia_jax.io_utils import iter_jsonl_objects
from pythia_jax.process_env import environment_set

logger = logging.getLogger(__name__)

INSTALL_HINT = "install it with: pip install 'pythia-jax[lm_eval]'"


@dataclasses.dataclass(frozen=True)
class HarnessTask:
    """One harness task on a local file.

    ``yaml``: the task file relative to ``lm_eval/tasks``; ``file``: default file name under the
    data directory; ``fields``: fields each document must have (after ``renames``, which map a
    local field name to the harness's).
    """

    name: str
    harness: str
    yaml: str
    file: str
    fields: tuple[str, ...]
    renames: Mapping[str, str] = dataclasses.field(default_factory=dict)


HARNESS_TASKS: dict[str, HarnessTask] = {t.name: t for t in (
    HarnessTask("piqa", "piqa", "piqa/piqa.yaml", "piqa.jsonl", ("goal", "sol1", "sol2", "label")),
    HarnessTask("arc_easy", "arc_easy", "arc/arc_easy.yaml", "arc_easy.jsonl",
                ("question", "choices", "answerKey")),
    HarnessTask("arc_challenge", "arc_challenge", "arc/arc_challenge.yaml", "arc_challenge.jsonl",
                ("question", "choices", "answerKey")),
    HarnessTask("sciq", "sciq", "sciq/sciq.yaml", "sciq.jsonl",
                ("question", "correct_answer", "distractor1", "distractor2", "distractor3", "support")),
    HarnessTask("winogrande", "winogrande", "winogrande/default.yaml", "winogrande.jsonl",
                ("sentence", "option1", "option2", "answer")),
    HarnessTask("lambada_openai", "lambada_openai", "lambada/lambada_openai.yaml", "lambada_openai.jsonl",
                ("text",)),
    HarnessTask("logiqa", "logiqa", "logiqa/logiqa.yaml", "logiqa.jsonl",
                ("label", "context", "question", "options"), renames={"query": "question"}),
    HarnessTask("wsc", "wsc", "super_glue/wsc/default.yaml", "wsc.jsonl",
                ("text", "span1_text", "span2_index", "span2_text", "label")),
    HarnessTask("crows_pairs", "crows_pairs_english", "crows_pairs/crows_pairs_english.yaml",
                "crows_pairs_anonymized.csv", ("sent_more", "sent_less", "bias_type")),
    HarnessTask("crows_pairs_gender", "crows_pairs_english_gender",
                "crows_pairs/crows_pairs_english_gender.yaml", "crows_pairs_anonymized.csv",
                ("sent_more", "sent_less", "bias_type")),
)}
ALIASES = {t.harness: t.name for t in HARNESS_TASKS.values() if t.harness != t.name}


def canonical_name(name: str) -> str | None:
    """Our task name for ``name`` (ours or the harness's), or None when it is not a harness task."""
    if name in HARNESS_TASKS:
        return name
    return ALIASES.get(name)


def lm_eval_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval(what: str) -> None:
    """Raise a one-line PythiaJaxError when lm_eval is not importable."""
    if not lm_eval_available():
        raise PythiaJaxError(f"{what} runs on lm-evaluation-harness's own task definition, but the "
                             f"module lm_eval is not installed; {INSTALL_HINT}")


def check_fields(path: Path, fields: Sequence[str], renames: Mapping[str, str], what: str) -> None:
    """DataError naming ``path:line`` at the first document (JSONL: every line; CSV: the header)
    that lacks one of ``fields`` (a field renamed by ``renames`` counts under its new name)."""

    def missing(have: Sequence[str]) -> list[str]:
        names = set(have) | {renames[k] for k in renames if k in have}
        return [f for f in fields if f not in names]

    if path.suffix == ".csv":
        try:
            with open(path, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {path}: {e}") from None
        if missing(header):
            raise DataError(f"{path}:1: {what} needs columns {missing(header)}; the header has {header}")
        return
    n = 0
    for lineno, row in iter_jsonl_objects(path):  # names path:line of bad JSON / non-objects
        if missing(row):
            raise DataError(f"{path}:{lineno}: {what} needs fields {missing(row)}; "
                            f"the row has {sorted(row)}")
        n += 1
    if not n:
        raise DataError(f"{path}: no documents")


def _rename_then(renames: Mapping[str, str], then: Callable | None) -> Callable:
    def process_docs(dataset):
        todo = {a: b for a, b in renames.items() if a in dataset.column_names and b not in dataset.column_names}
        if todo:
            dataset = dataset.rename_columns(todo)
        return then(dataset) if then is not None else dataset
    return process_docs


def build_task(name: str, data_file: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None):
    """The harness's ``ConfigurableTask`` for ``name`` whose documents come from ``data_file``.

    Args:
      name: one of ``HARNESS_TASKS`` (or its harness alias), or a path to a harness task YAML.
      data_file: a ``.jsonl``/``.json`` or ``.csv`` file with the fields the task reads.
      cache_dir: where ``datasets`` keeps its Arrow copy (default: its usual cache).

    The task's one evaluation split is the file (no few-shot split; the Pythia evaluations are
    zero-shot). Raises DataError when the file is missing or lacks a field, PythiaJaxError when
    lm_eval is not installed or the task is unknown.
    """
    path = Path(data_file)
    yaml_path = Path(name)
    spec = None
    if yaml_path.suffix not in (".yaml", ".yml"):
        canon = canonical_name(name)
        if canon is None:
            raise PythiaJaxError(f"unknown harness task {name!r}; known: {', '.join(sorted(HARNESS_TASKS))} "
                                 f"(or give a harness task .yaml path)")
        spec = HARNESS_TASKS[canon]
    require_lm_eval(f"task {name!r}")
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise DataError(f"task {name}: data file {path} does not exist"
                        + (f" (expected {spec.file} under --data-dir)" if spec else ""))
    if path.suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"task {name}: data file {path} must be .jsonl, .json or .csv")
    if spec is not None:
        yaml_path = Path(lm_eval.__file__).parent / "tasks" / spec.yaml
        check_fields(path, spec.fields, spec.renames, f"task {name} (the harness's {spec.harness} format)")
    cfg = load_yaml(yaml_path)
    split = "test"
    dataset_kwargs: dict[str, Any] = {"data_files": {split: os.path.abspath(path)}}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = os.fspath(cache_dir)
    cfg.update(dataset_path="csv" if path.suffix == ".csv" else "json", dataset_name=None,
               dataset_kwargs=dataset_kwargs, test_split=split, validation_split=None,
               training_split=None, fewshot_split=None)
    if spec is not None:
        cfg["task"] = spec.name
        if spec.renames:
            cfg["process_docs"] = _rename_then(spec.renames, cfg.get("process_docs"))
    for key in ("tag", "group"):
        cfg.pop(key, None)
    return ConfigurableTask(config=cfg)


@dataclasses.dataclass
class HarnessResult:
    """``metrics``: name -> (value, stderr) as the harness aggregates them (stderr NaN where the
    harness gives none); ``per_example``: one dict per document (``doc_id``, ``target``, the
    filtered responses and the per-document metric values)."""

    task: str
    metrics: dict[str, tuple[float, float]]
    per_example: list[dict[str, Any]]
    num_examples: int


def _number(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (str, bool, int)) or x is None:
        return x
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def evaluate_task(lm: Any, task: Any, *, limit: int | None = None,
                  bootstrap_iters: int = 100000) -> HarnessResult:
    """Run one harness task with ``lm`` (a ``PythiaJaxLM`` or any harness LM) through
    ``lm_eval.evaluator.evaluate`` and return its metrics and per-document outputs.

    ``bootstrap_iters``: draws for the harness's bootstrapped standard errors (perplexity);
    0 makes the harness skip every standard error (NaN in ``metrics``), the closed-form ones too.
    """
    from lm_eval import evaluator

    name = task.config.task
    # The harness bootstraps in a forked process pool unless DISABLE_MULTIPROC is set; forking a
    # process that runs JAX's threads can deadlock, so the draws run in this process.
    with environment_set({"DISABLE_MULTIPROC": "1"}):
        out = evaluator.evaluate(lm=lm, task_dict={name: task}, limit=limit, bootstrap_iters=bootstrap_iters,
                                 log_samples=True, verbosity="WARNING")
    res = out["results"][name]
    samples = out.get("samples", {}).get(name, [])
    metrics: dict[str, tuple[float, float]] = {}
    for key, value in res.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        label = metric if filt == "none" else f"{metric}_{filt}"
        metrics[label] = (_number(value), _number(res.get(f"{metric}_stderr,{filt}")))
    metric_names = {k.split(",")[0] for k in res if "," in k and "_stderr," not in k}
    per_example = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        row = {"doc_id": int(s["doc_id"]), "target": _jsonable(s.get("target")),
               "resps": _jsonable(s.get("filtered_resps"))}
        row.update({m: _jsonable(s[m]) for m in metric_names if m in s})
        per_example.append(row)
    n = len(samples)
    if not n:
        n = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
    for label, (v, _) in metrics.items():
        if math.isnan(v):
            logger.warning("task %s: metric %s is not a number", name, label)
    return HarnessResult(task=name, metrics=metrics, per_example=per_example, num_examples=n)


def default_file(name: str, data_dir: str | os.PathLike | None) -> Path:
    """``data_dir/<the task's file>``; DataError without a data directory."""
    spec = HARNESS_TASKS[canonical_name(name) or name]
    if data_dir is None:
        raise DataError(f"task {name}: no data directory given (--data-dir with {spec.file})")
    return Path(data_dir) / spec.file

