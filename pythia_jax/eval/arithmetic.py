"""The arithmetic task family of the Pythia paper's term-frequency study (Biderman et al. 2023, §5,
after Razeghi et al. 2022, "Impact of Pretraining Term Frequencies on Few-Shot Reasoning").

For each operation (``plus``, ``times``) and each first operand ``x1`` in 0…99 there is one task of
50 test items, the second operand ``x2`` in 1…50: 200 tasks. A test item's prompt is

    Q:What is {x1} plus {x2}? A:

(``times`` for multiplication), after ``k`` solved examples (k in 0, 2, 4, 8, 16), one per line:

    Q:What is 37 plus 12? A: 49
    Q:What is 81 plus 5? A: 86
    Q:What is 7 plus 3? A:

i.e. every example is the same template followed by a space and the answer, examples and the
test prompt are joined with a single ``"\\n"``. (Razeghi et al.'s code put ``Q:`` and ``A:`` on
separate lines with a blank line between examples; the Pythia study's prompt is the one-line
form above, so the examples use it too.)

Few-shot examples come from the *other* operands: each example's first operand is drawn from
0…99 without ``x1`` and its second operand from 1…50 without ``x1``, so the test operand never
appears in the examples; the k first operands are distinct. The draw is deterministic:
``numpy.random.default_rng([FEWSHOT_SEED, op_index, x1, x2])`` (FEWSHOT_SEED = 1234, op_index 0
for plus, 1 for times) draws 16 examples and the k-shot prompt uses the first k of them, so the
examples of a smaller k are a prefix of those of a larger k.

Scoring: greedy generation until a newline, at most 16 new tokens; an item is correct when the
first integer in the output (``-?\\d+`` after removing digit-group commas) equals the answer.
Results: accuracy per task (operation, k) over all operands, and per (operation, operand, k).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Sequence

import numpy as np

from pythia_jax.errors import PythiaJaxError

logger = logging.getLogger(__name__)

OPERATIONS = ("plus", "times")
FIRST_OPERANDS = tuple(range(0, 100))
SECOND_OPERANDS = tuple(range(1, 51))
DEFAULT_SHOTS = (0, 2, 4, 8, 16)
MAX_SHOTS = 16
MAX_NEW_TOKENS = 16
STOP = "\n"
FEWSHOT_SEED = 1234
TEMPLATE = "Q:What is {x1} {op} {x2}? A:"
_FIRST_INT = re.compile(r"-?\d+")
TASK_RE = re.compile(r"^arithmetic(?:_(plus|times))?(?:_k(\d+))?$")


def answer(op: str, x1: int, x2: int) -> int:
    """The exact answer of ``x1 op x2``."""
    if op == "plus":
        return x1 + x2
    if op == "times":
        return x1 * x2
    raise PythiaJaxError(f"unknown arithmetic operation {op!r}; expected one of {OPERATIONS}")


def question(op: str, x1: int, x2: int) -> str:
    """``Q:What is {x1} {op} {x2}? A:`` (no trailing space)."""
    return TEMPLATE.format(x1=x1, op=op, x2=x2)


def fewshot_examples(op: str, x1: int, x2: int, k: int) -> list[tuple[int, int]]:
    """The ``k`` (a, b) example operand pairs of test item (op, x1, x2); the first ``k`` of a fixed
    draw of ``MAX_SHOTS``: a from 0…99 without x1 (distinct), b from 1…50 without x1."""
    if not 0 <= k <= MAX_SHOTS:
        raise PythiaJaxError(f"arithmetic: k={k} shots; expected 0…{MAX_SHOTS}")
    rng = np.random.default_rng([FEWSHOT_SEED, OPERATIONS.index(op), x1, x2])
    firsts = [a for a in FIRST_OPERANDS if a != x1]
    seconds = [b for b in SECOND_OPERANDS if b != x1]
    a = rng.choice(firsts, size=MAX_SHOTS, replace=False)
    b = rng.choice(seconds, size=MAX_SHOTS, replace=True)
    return [(int(p), int(q)) for p, q in zip(a[:k], b[:k])]


def prompt(op: str, x1: int, x2: int, k: int) -> str:
    """The full k-shot prompt of one test item (see the module docstring)."""
    lines = [f"{question(op, a, b)} {answer(op, a, b)}" for a, b in fewshot_examples(op, x1, x2, k)]
    lines.append(question(op, x1, x2))
    return "\n".join(lines)


def first_integer(text: str) -> int | None:
    """The first integer in a model's output (digit-group commas removed first), or None."""
    m = _FIRST_INT.search(re.sub(r"(?<=\d),(?=\d{3})", "", text))
    return int(m.group(0)) if m else None


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean of per-item scores and its standard error (sample std / sqrt(n), as the harness's
    ``mean_stderr``); NaN where undefined (no items; fewer than two for the error)."""
    v = np.asarray(list(values), float)
    mean = float(v.mean()) if v.size else float("nan")
    stderr = float(np.std(v, ddof=1) / math.sqrt(v.size)) if v.size >= 2 else float("nan")
    return mean, stderr


@dataclasses.dataclass(frozen=True)
class Item:
    op: str
    x1: int
    x2: int
    k: int

    @property
    def answer(self) -> int:
        return answer(self.op, self.x1, self.x2)

    @property
    def prompt(self) -> str:
        return prompt(self.op, self.x1, self.x2, self.k)


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """One runner task: an operation at k shots over ``operands`` x ``second`` operands."""

    op: str
    k: int
    operands: tuple[int, ...] = FIRST_OPERANDS
    second: tuple[int, ...] = SECOND_OPERANDS

    @property
    def name(self) -> str:
        return f"arithmetic_{self.op}_k{self.k}"

    def items(self) -> list[Item]:
        return [Item(self.op, x1, x2, self.k) for x1 in self.operands for x2 in self.second]


def expand_task_name(name: str, shots: Sequence[int] | None, limit: int | None = None
                     ) -> list[ArithmeticTask] | None:
    """Runner tasks named by ``name``: ``arithmetic`` (both operations), ``arithmetic_plus`` /
    ``arithmetic_times`` (each at every k of ``shots``, default 0, 2, 4, 8, 16) or one task such as
    ``arithmetic_times_k4``. ``limit`` keeps the second operands 1…limit. None if ``name`` is not
    an arithmetic task."""
    m = TASK_RE.match(name)
    if not m:
        return None
    ops = (m.group(1),) if m.group(1) else OPERATIONS
    if m.group(2) is not None:
        ks: Sequence[int] = (int(m.group(2)),)
    else:
        ks = tuple(shots) if shots else DEFAULT_SHOTS
    for k in ks:
        if not 0 <= k <= MAX_SHOTS:
            raise PythiaJaxError(f"task {name!r}: {k} shots; the arithmetic tasks take 0…{MAX_SHOTS}")
    if limit is not None and limit < 1:
        raise PythiaJaxError(f"--limit {limit}: expected >= 1")
    second = SECOND_OPERANDS[:limit] if limit else SECOND_OPERANDS
    return [ArithmeticTask(op, k, second=second) for op in ops for k in ks]


class ItemScores:
    """Mixin of a generation task's result: ``per_item`` dicts with a ``correct`` field give
    ``accuracy`` and its ``stderr`` (``mean_and_stderr``)."""

    per_item: list[dict[str, Any]]

    @property
    def accuracy(self) -> float:
        return mean_and_stderr([r["correct"] for r in self.per_item])[0]

    @property
    def stderr(self) -> float:
        return mean_and_stderr([r["correct"] for r in self.per_item])[1]


@dataclasses.dataclass
class ArithmeticResult(ItemScores):
    """``per_item``: one dict per test item (op, x1, x2, k, output, prediction, answer, correct);
    ``per_operand``: (op, x1, k, correct, total, acc) per first operand."""

    task: ArithmeticTask
    per_item: list[dict[str, Any]]

    @property
    def per_operand(self) -> list[dict[str, Any]]:
        out: dict[int, list[bool]] = {}
        for r in self.per_item:
            out.setdefault(r["x1"], []).append(bool(r["correct"]))
        return [{"op": self.task.op, "x1": x1, "k": self.task.k, "correct": int(sum(c)),
                 "total": len(c), "acc": sum(c) / len(c)} for x1, c in sorted(out.items())]


def evaluate_arithmetic(generator: Any, tokenizer: Any, task: ArithmeticTask) -> ArithmeticResult:
    """Greedy-generate every item of ``task`` in batches (``generate.generate_until``, stop at a
    newline or EOD, at most 16 new tokens) and score it."""
    from pythia_jax.eval.generate import generate_until
    from pythia_jax.eval.tokens import encode

    items = task.items()
    prompts = [encode(tokenizer, it.prompt) for it in items]
    outputs = generate_until(generator, tokenizer, prompts, [STOP], MAX_NEW_TOKENS)
    per_item = []
    for it, out in zip(items, outputs):
        pred = first_integer(out)
        per_item.append({"op": it.op, "x1": it.x1, "x2": it.x2, "k": it.k, "output": out,
                         "prediction": pred, "answer": it.answer, "correct": pred == it.answer})
    res = ArithmeticResult(task, per_item)
    logger.info("%s: acc %.4f over %d items", task.name, res.accuracy, len(per_item))
    return res
