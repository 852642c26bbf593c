"""TriviaQA without context (``rc.nocontext``), k-shot, scored as lm-evaluation-harness's
``triviaqa`` task (``lm_eval/tasks/triviaqa/default.yaml``, harness v0.4) scores it.

Rows are the dataset's JSON objects: ``question`` (str) and ``answer.aliases`` (list of str).

- Prompt: ``"Question: {question}?\\nAnswer:"`` (the question keeps its own ``?``, so most
  prompts end ``??``, exactly as the harness writes them). k-shot: k solved examples first, each
  the same template + ``" "`` + the example's first alias, joined and followed by ``"\\n\\n"``.
- Few-shot examples, as the harness's default ``ContextSampler`` draws them when the examples come
  from the evaluated split itself and the sampler is seeded as ``simple_evaluate`` (the lm_eval
  CLI) seeds it (``fewshot_random_seed=1234``): one ``random.Random(1234)`` for the task, and for each
  evaluated row in file order ``k + 1`` rows are sampled from all rows, the evaluated row is
  removed and the first ``k`` remain (resampled without it if duplicates of it left fewer).
- Generation: greedy, until ``"\\n"``, ``"."`` or ``","`` (or EOD), at most ``max_gen_toks``
  (256, the harness's default) new tokens; the text is cut at the first of each stop string in
  turn.
- Score (``exact_match`` with ``ignore_case`` and ``ignore_punctuation``, filter
  ``remove_whitespace``): the output is stripped of surrounding whitespace; prediction and each
  alias are lower-cased and stripped of ``string.punctuation``; correct when the prediction equals
  any alias (no other normalisation: articles and inner spaces count).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import string
from typing import Any, Sequence

from pythia_jax.errors import DataError, PythiaJaxError
from pythia_jax.eval.arithmetic import ItemScores

logger = logging.getLogger(__name__)

TEMPLATE = "Question: {question}?\nAnswer:"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
FEWSHOT_SEED = 1234
UNTIL = ("\n", ".", ",")
MAX_GEN_TOKS = 256
DEFAULT_SHOTS = (0,)
TASK_RE = re.compile(r"^triviaqa(?:_k(\d+))?$")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """The harness's exact-match normalisation for ``triviaqa``: lower case, then every character
    of ``string.punctuation`` removed (``exact_match_hf_evaluate`` with ``ignore_case`` and
    ``ignore_punctuation``)."""
    return text.lower().translate(_PUNCT)


def is_correct(output: str, aliases: Sequence[str]) -> bool:
    """``remove_whitespace`` (strip) the output, then exact match against any alias."""
    pred = normalize(output.strip())
    return any(pred == normalize(a) for a in aliases)


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a TriviaQA JSONL file; each must have ``question`` and a non-empty
    ``answer.aliases`` list. Raises ``DataError`` naming the bad line."""
    from pythia_jax.io_utils import iter_jsonl_objects

    if not os.path.exists(path):
        raise DataError(f"{path}: no such file; expected TriviaQA rows (question, answer.aliases) as JSONL")
    rows = []
    for lineno, row in iter_jsonl_objects(path):
        aliases = (row.get("answer") or {}).get("aliases") if isinstance(row.get("answer"), dict) else None
        if not isinstance(row.get("question"), str) or not isinstance(aliases, list) or not aliases:
            raise DataError(f"{path}:{lineno}: expected a 'question' string and a non-empty "
                            f"'answer.aliases' list, got keys {sorted(row)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def fewshot_prompts(rows: Sequence[dict], k: int, n_eval: int | None = None) -> list[str]:
    """The k-shot prompt of each of the first ``n_eval`` rows (all by default), examples drawn
    from all ``rows`` as described in the module docstring."""
    if k < 0:
        raise PythiaJaxError(f"triviaqa: {k} shots; expected >= 0")
    if k >= len(rows):
        raise PythiaJaxError(f"triviaqa: {k} shots need more than {k} rows, the file has {len(rows)}")
    rnd = random.Random(FEWSHOT_SEED)
    pool = list(rows)
    out = []
    for doc in rows[:n_eval]:
        text = TEMPLATE.format(question=doc["question"])
        if k:
            shots = [x for x in rnd.sample(pool, k + 1) if x != doc][:k]
            if len(shots) < k:
                shots = rnd.sample([x for x in pool if x != doc], k)
            examples = [TEMPLATE.format(question=s["question"]) + TARGET_DELIMITER + s["answer"]["aliases"][0]
                        for s in shots]
            text = FEWSHOT_DELIMITER.join(examples) + FEWSHOT_DELIMITER + text
        out.append(text)
    return out


@dataclasses.dataclass(frozen=True)
class TriviaQATask:
    """One runner task: ``k`` shots over the rows of ``path`` (the first ``limit``)."""

    path: str
    k: int = 0
    limit: int | None = None

    @property
    def name(self) -> str:
        return f"triviaqa_k{self.k}"


def expand_task_name(name: str, data_dir: str | None, shots: Sequence[int] | None,
                     limit: int | None = None) -> list[TriviaQATask] | None:
    """``triviaqa`` (at each k of ``shots``, default 0) or ``triviaqa_k5``; rows from
    ``<data_dir>/triviaqa.jsonl``. None if ``name`` is not a TriviaQA task."""
    m = TASK_RE.match(name)
    if not m:
        return None
    if not data_dir:
        raise PythiaJaxError(f"task {name!r} needs --data-dir holding triviaqa.jsonl")
    path = os.path.join(data_dir, "triviaqa.jsonl")
    ks = (int(m.group(1)),) if m.group(1) is not None else (tuple(shots) if shots else DEFAULT_SHOTS)
    return [TriviaQATask(path, k, limit) for k in ks]


@dataclasses.dataclass
class TriviaQAResult(ItemScores):
    task: TriviaQATask
    per_item: list[dict[str, Any]]


def evaluate_triviaqa(generator: Any, tokenizer: Any, task: TriviaQATask, rows: Sequence[dict] | None = None,
                      max_gen_toks: int = MAX_GEN_TOKS) -> TriviaQAResult:
    """Generate the answers in batches (``generate.generate_until``) and score them."""
    from pythia_jax.eval.generate import generate_until
    from pythia_jax.eval.tokens import encode

    rows = load_rows(task.path) if rows is None else list(rows)
    prompts = fewshot_prompts(rows, task.k, task.limit)
    outputs = generate_until(generator, tokenizer, [encode(tokenizer, p) for p in prompts], UNTIL,
                             max_gen_toks)
    per_item = [{"question_id": r.get("question_id"), "output": o,
                 "correct": is_correct(o, r["answer"]["aliases"])}
                for r, o in zip(rows, outputs)]
    res = TriviaQAResult(task, per_item)
    logger.info("%s: exact_match %.4f over %d questions", task.name, res.accuracy, len(per_item))
    return res
