"""Zero-shot multiple choice, scored like lm-evaluation-harness.

For every example each choice's continuation is scored by its summed log-likelihood; ``acc`` is
1 when the argmax is gold, ``acc_norm`` when the argmax of loglik / len(choice in characters) is
gold. The aggregate is the mean with the standard error of the mean (sample std / sqrt(n)), the
harness's ``mean_stderr``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from pythia_jax.eval.tasks import Example, TaskSpec
from pythia_jax.eval.tokens import encode_pair


@dataclasses.dataclass
class TaskResult:
    """``metrics``: name -> (mean, stderr); ``per_example``: one dict per example with the gold
    index, each choice's log-likelihood and the per-metric hit; ``truncated``: requests whose
    context was cut from the left to fit the window."""

    task: str
    metrics: dict[str, tuple[float, float]]
    per_example: list[dict[str, Any]]
    truncated: int
    num_examples: int


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the n-1 sample standard deviation (0 for n < 2)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def tokenize_examples(tokenizer: Any, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    """Every (context, continuation) pair of ``examples`` as harness-style token pairs."""
    return [encode_pair(tokenizer, ctx, cont) for ex in examples for ctx, cont in ex.requests]


def choice_hits(lls: Any, choice_chars: Any, gold: int) -> tuple[float, float]:
    """``(acc, acc_norm)`` of one multiple-choice example, as the harness: the highest
    log-likelihood, and the highest log-likelihood per character of the choice text, is ``gold``."""
    lls = np.asarray(lls, np.float64)
    return (float(int(np.argmax(lls)) == gold),
            float(int(np.argmax(lls / np.asarray(choice_chars, np.float64))) == gold))


def score_examples(spec: TaskSpec, examples: Sequence[Example], logliks: Sequence[float],
                   truncated: int = 0) -> TaskResult:
    """Turn per-request log-likelihoods (flattened in example order) into metrics."""
    per_example: list[dict[str, Any]] = []
    hits: dict[str, list[float]] = {m: [] for m in spec.metrics}
    k = 0
    for ex in examples:
        lls = np.asarray(logliks[k:k + len(ex.requests)], np.float64)
        k += len(ex.requests)
        row: dict[str, Any] = {"doc_id": ex.doc_id, "gold": ex.gold, "loglik": lls.tolist()}
        acc, acc_norm = choice_hits(lls, [len(c) for c in ex.choice_texts], ex.gold)
        for name, value in (("acc", acc), ("acc_norm", acc_norm)):
            if name in hits:
                row[name] = value
                hits[name].append(value)
        per_example.append(row)
    if k != len(logliks):
        raise ValueError(f"{len(logliks)} log-likelihoods for {k} requests")
    metrics = {m: (float(np.mean(v)), mean_stderr(v)) for m, v in hits.items()}
    return TaskResult(task=spec.name, metrics=metrics, per_example=per_example, truncated=truncated,
                      num_examples=len(examples))


def evaluate_task(scorer: Any, tokenizer: Any, spec: TaskSpec, examples: Sequence[Example],
                  progress: bool = False) -> TaskResult:
    """Score all choices of ``examples`` with ``scorer`` (a ``Scorer``) and compute the metrics."""
    requests = tokenize_examples(tokenizer, examples)
    res = scorer.loglikelihood(requests, progress=progress)
    return score_examples(spec, examples, res.loglik, truncated=res.truncated)
