"""The runner's generation tasks: the arithmetic family (``pythia_jax.eval.arithmetic``) and
TriviaQA (``pythia_jax.eval.triviaqa``), both generated in batches with the KV cache.

``resolve`` turns a ``--tasks`` entry into runner tasks (one per k: ``arithmetic_plus_k4``,
``triviaqa_k0``, …) or None for a name that is not a generation task; ``run`` evaluates one at one
step and returns the table rows (metric ``acc``; TriviaQA's is the harness's ``exact_match``),
writing each item's output to ``details`` (JSON lines) when given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from pythia_jax.eval import arithmetic, triviaqa

TASK_TYPES = (arithmetic.ArithmeticTask, triviaqa.TriviaQATask)


def resolve(name: str, *, data_dir: str | None, shots: Sequence[int] | None, limit: int | None
            ) -> dict[str, Any] | None:
    """{task name: task} for ``name``, or None if it is not a generation task. Checks the data
    (TriviaQA rows) now, before any model is loaded."""
    tasks = arithmetic.expand_task_name(name, shots, limit)
    if tasks is None:
        tasks = triviaqa.expand_task_name(name, data_dir, shots, limit)
        if tasks is None:
            return None
        rows = triviaqa.load_rows(tasks[0].path)
        for t in tasks:
            if not 0 <= t.k < len(rows):
                raise triviaqa.PythiaJaxError(f"task {t.name}: {t.k} shots; expected 0…{len(rows) - 1} "
                                              f"for the {len(rows)} rows of {t.path}")
    return {t.name: t for t in tasks}


def run(generator: Any, tokenizer: Any, step: int, task: Any, details: Path | None) -> list[dict[str, Any]]:
    """Evaluate ``task`` with ``generator`` (the model of ``step``); rows for the results table."""
    if isinstance(task, arithmetic.ArithmeticTask):
        res = arithmetic.evaluate_arithmetic(generator, tokenizer, task)
        metric = "acc"
    else:
        res = triviaqa.evaluate_triviaqa(generator, tokenizer, task)
        metric = "exact_match"
    if details is not None:  # a hidden temporary sibling, renamed into place (removed on failure)
        from pythia_jax.io_utils import atomic_files

        with atomic_files(details) as (tmp,), open(tmp, "w", encoding="utf-8") as f:
            for r in res.per_item:
                f.write(json.dumps({"step": int(step), **r}) + "\n")
    return [{"step": int(step), "task": task.name, "metric": metric, "value": res.accuracy,
             "stderr": res.stderr, "num_examples": len(res.per_item)}]
