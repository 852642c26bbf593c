"""Zero-shot multiple-choice tasks as data: one YAML spec per task turns JSONL rows into requests.

A spec (``pythia_jax/eval/task_specs/<name>.yaml``) says which fields a row must have, how the
prompt (context) is written, what the answer choices are and which one is gold; adding a task is
adding a spec. The formats reproduce lm-evaluation-harness (the tool the Pythia paper used):

- ``context``: a template; ``{a.b}`` reads ``row["a"]["b"]``, ``{x|lstrip}`` applies a filter
  (``lstrip``, ``strip``, ``rstrip``).
- ``choices``: a list of templates, or ``choices_from``: a field holding a list of strings.
- ``gold``: ``{field: F}`` (an int), ``{field: F, map: {...}}``, ``{field: F, index_in: G}``
  (the position of ``row[F]`` in the list ``row[G]``) or ``{constant: N}``.
- ``target_delimiter`` (default ``" "``) goes in front of every continuation.
- ``partial: {field: sentence, blank: "_"}`` (WinoGrande): each choice fills the blank and the
  sentence is cut there (the contexts differ), the continuation is the rest after the blank.
- ``metrics``: ``acc`` (argmax of summed log-likelihood) and/or ``acc_norm`` (argmax of
  log-likelihood divided by the choice's length in characters).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping

from pythia_jax.errors import DataError
from pythia_jax.io_utils import iter_jsonl_objects

SPEC_DIR = Path(__file__).resolve().parent / "task_specs"
KNOWN_METRICS = ("acc", "acc_norm")
_FILTERS = {"lstrip": str.lstrip, "rstrip": str.rstrip, "strip": str.strip}
_PLACEHOLDER = re.compile(r"\{([^{}|]+)(?:\|(\w+))?\}")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One multiple-choice task: how a JSONL row becomes contexts, continuations and a gold index."""

    name: str
    file: str
    fields: tuple[str, ...]
    context: str = ""
    choices: tuple[str, ...] = ()
    choices_from: str | None = None
    gold: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    partial: Mapping[str, str] | None = None
    target_delimiter: str = " "
    metrics: tuple[str, ...] = ("acc", "acc_norm")

    def __post_init__(self) -> None:
        where = f"task spec {self.name!r}"
        if bool(self.choices) == bool(self.choices_from):
            raise DataError(f"{where}: give exactly one of 'choices' or 'choices_from'")
        if not self.partial and not self.context:
            raise DataError(f"{where}: needs 'context' (or 'partial')")
        if not ({"field", "constant"} & set(self.gold)):
            raise DataError(f"{where}: 'gold' needs 'field' or 'constant', got {dict(self.gold)}")
        for m in self.metrics:
            if m not in KNOWN_METRICS:
                raise DataError(f"{where}: unknown metric {m!r}; known: {KNOWN_METRICS}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "TaskSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataError(f"{source}: unknown task spec keys {sorted(unknown)}")
        for key in ("name", "file", "fields"):
            if key not in d:
                raise DataError(f"{source}: task spec lacks {key!r}")
        d = dict(d)
        for key in ("fields", "choices", "metrics"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Example:
    """One scored document: a (context, continuation) pair per choice and the gold index.

    ``choice_texts`` are the bare choices whose character lengths normalise ``acc_norm``.
    """

    doc_id: int
    requests: tuple[tuple[str, str], ...]
    choice_texts: tuple[str, ...]
    gold: int


def available_tasks() -> list[str]:
    """Names of the bundled task specs."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | os.PathLike) -> TaskSpec:
    """A bundled spec by name (``piqa``) or a spec file by path."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = SPEC_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise DataError(f"unknown task {str(name_or_path)!r}; bundled tasks: "
                            f"{', '.join(available_tasks())} (or give a spec .yaml path)")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"cannot read task spec {path}: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: a task spec must be a mapping")
    return TaskSpec.from_dict(d, source=str(path))


def _get(row: Mapping[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def render(template: str, row: Mapping[str, Any]) -> str:
    """Fill ``{field}``, ``{a.b}`` and ``{field|filter}`` placeholders from ``row``."""

    def sub(m: re.Match) -> str:
        value = str(_get(row, m.group(1).strip()))
        if m.group(2):
            value = _FILTERS[m.group(2)](value)
        return value

    return _PLACEHOLDER.sub(sub, template)


def build_example(spec: TaskSpec, row: Mapping[str, Any], doc_id: int) -> Example:
    """Requests of one row; raises KeyError (missing field) or ValueError (bad gold / blank)."""
    for field in spec.fields:
        _get(row, field)
    if spec.choices_from:
        choices = _get(row, spec.choices_from)
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"field {spec.choices_from!r} must be a list of strings")
        choices = [str(c) for c in choices]
    else:
        choices = [render(t, row) for t in spec.choices]
    gold_rule = spec.gold
    if "constant" in gold_rule:
        gold = int(gold_rule["constant"])
    else:
        raw = _get(row, gold_rule["field"])
        if "map" in gold_rule:
            mapping = {str(k): int(v) for k, v in gold_rule["map"].items()}
            if str(raw) not in mapping:
                raise ValueError(f"gold value {raw!r} not in {sorted(mapping)}")
            gold = mapping[str(raw)]
        elif "index_in" in gold_rule:
            labels = list(_get(row, gold_rule["index_in"]))
            if raw not in labels:
                raise ValueError(f"gold {raw!r} not among {gold_rule['index_in']} {labels}")
            gold = labels.index(raw)
        else:
            try:
                gold = int(raw)
            except (TypeError, ValueError):
                raise ValueError(f"gold field {gold_rule['field']!r} is not an integer: {raw!r}") from None
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} out of range for {len(choices)} choices")
    if spec.partial:
        sentence = str(_get(row, spec.partial["field"]))
        blank = spec.partial.get("blank", "_")
        if blank not in sentence:
            raise ValueError(f"field {spec.partial['field']!r} has no blank {blank!r}")
        cut = sentence.index(blank)
        target = spec.target_delimiter + sentence[cut + len(blank):].strip()
        requests = tuple((sentence[:cut] + c, target) for c in choices)
    else:
        context = render(spec.context, row)
        requests = tuple((context, spec.target_delimiter + c) for c in choices)
    return Example(doc_id=doc_id, requests=requests, choice_texts=tuple(choices), gold=gold)


def load_examples(spec: TaskSpec, data_dir: str | os.PathLike | None = None, *,
                  path: str | os.PathLike | None = None, limit: int | None = None) -> list[Example]:
    """Read ``data_dir/spec.file`` (or ``path``) and build one Example per line.

    A line that is not JSON, lacks a field or has an unusable gold raises DataError naming the
    file, the line number and the problem.
    """
    if path is None:
        if data_dir is None:
            raise DataError(f"task {spec.name}: no data directory given (--data-dir)")
        path = Path(data_dir) / spec.file
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task {spec.name}: data file {path} does not exist")
    examples: list[Example] = []
    for lineno, row in iter_jsonl_objects(path):
        if limit is not None and len(examples) >= limit:
            break
        try:
            examples.append(build_example(spec, row, doc_id=len(examples)))
        except KeyError as e:
            raise DataError(f"{path}:{lineno}: task {spec.name} needs field {e.args[0]!r}, "
                            f"row has {sorted(row)}") from None
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: task {spec.name}: {e}") from None
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples
