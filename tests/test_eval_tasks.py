"""Task specs: prompts, choices and gold equal lm-evaluation-harness's own requests; bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pythia_jax.errors import DataError
from pythia_jax.eval import tasks as T
from pythia_jax.eval.tokens import encode_pair, rolling_windows
from pythia_jax.eval.zero_shot import mean_stderr, score_examples

DATA = Path(__file__).parent / "data" / "eval"
TASKS = ["piqa", "arc_easy", "arc_challenge", "sciq", "winogrande"]


def test_bundled_tasks():
    assert set(TASKS) <= set(T.available_tasks())


@pytest.mark.parametrize("name", TASKS)
def test_requests_equal_harness(name, tmp_path):
    """Contexts, continuations and gold indices equal the harness's for its own task YAML."""
    pytest.importorskip("lm_eval")
    from pythia_jax.eval.lm_eval_adapter import harness_task_from_file

    spec = T.load_spec(name)
    examples = T.load_examples(spec, DATA)
    task = harness_task_from_file(name, DATA / spec.file, cache_dir=tmp_path)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    assert len(by_doc) == len(examples)
    docs = list(task.eval_docs)
    for ex in examples:
        insts = sorted(by_doc[ex.doc_id], key=lambda i: i.idx)
        assert tuple(tuple(i.args) for i in insts) == ex.requests
        assert task.doc_to_target(docs[ex.doc_id]) == ex.gold or name == "winogrande"
        # Metrics from the harness's process_results on the same made-up log-likelihoods.
        fake = [(float(-len(c) * 0.37 - (k % 3)), False) for k, (_, c) in enumerate(ex.requests)]
        ours = score_examples(spec, [ex], [f[0] for f in fake])
        theirs = task.process_results(docs[ex.doc_id], fake)
        for m in spec.metrics:
            assert ours.per_example[0][m] == theirs[m], (name, ex.doc_id, m)


def test_formats_by_hand():
    piqa = T.load_examples(T.load_spec("piqa"), DATA, limit=1)[0]
    assert piqa.requests[0][0].startswith("Question: How do I ready a guinea pig cage")
    assert piqa.requests[0][0].endswith("\nAnswer:") and piqa.requests[0][1].startswith(" Provide")
    wino = T.load_examples(T.load_spec("winogrande"), DATA, limit=1)[0]
    assert wino.requests == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert wino.gold == 1
    sciq = T.load_examples(T.load_spec("sciq"), DATA, limit=1)[0]
    assert sciq.gold == 3 and sciq.requests[3][1] == " darwin"


def test_encode_pair_moves_trailing_space():
    class CharTok:  # one token per character: shows where the split happens
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]
    ctx, cont = encode_pair(CharTok(), "Answer: ", "yes")
    assert ctx == [ord(c) for c in "Answer:"] and cont == [ord(c) for c in " yes"]
    assert encode_pair(CharTok(), "", "a") == ([0], [ord("a")])


def test_rolling_windows_cover_every_token_once():
    tokens = list(range(1, 24))
    windows = list(rolling_windows(tokens, max_len=5))
    assert [t for _, c in windows for t in c] == tokens
    assert windows[0][0] == [0]
    for ctx, cont in windows:
        assert len(ctx) + len(cont) <= 6
        whole = ctx + cont
        assert whole == ([0] + tokens)[tokens.index(cont[0]) + 1 - len(ctx):tokens.index(cont[-1]) + 2]


def test_mean_stderr():
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx((1 / 3) ** 0.5 / 2)


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_missing_field_names_line(tmp_path):
    spec = T.load_spec("piqa")
    good = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}
    _write(tmp_path / "piqa.jsonl", [good, {"goal": "g", "sol1": "a", "label": 1}])
    with pytest.raises(DataError, match=r"piqa.jsonl:2: .*'sol2'"):
        T.load_examples(spec, tmp_path)


def test_bad_json_and_gold(tmp_path):
    spec = T.load_spec("arc_easy")
    f = _write(tmp_path / "arc_easy.jsonl", ["{not json"])
    with pytest.raises(DataError, match=r"arc_easy.jsonl:1: invalid JSON"):
        T.load_examples(spec, tmp_path)
    row = {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}
    _write(f, [row])
    with pytest.raises(DataError, match=r"arc_easy.jsonl:1: .*gold 'C'"):
        T.load_examples(spec, tmp_path)
    wino = T.load_spec("winogrande")
    _write(tmp_path / "winogrande.jsonl", [{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}])
    with pytest.raises(DataError, match=r"winogrande.jsonl:1: .*no blank"):
        T.load_examples(wino, tmp_path)


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        T.load_examples(T.load_spec("sciq"), tmp_path)
    with pytest.raises(DataError, match="unknown task 'nope'"):
        T.load_spec("nope")


def test_custom_spec_file(tmp_path):
    spec_file = tmp_path / "yesno.yaml"
    spec_file.write_text('name: yesno\nfile: yesno.jsonl\nfields: [q, a]\n'
                         'context: "Q: {q}\\nA:"\nchoices: ["yes", "no"]\ngold: {field: a}\n')
    _write(tmp_path / "yesno.jsonl", [{"q": "Is it?", "a": 1}])
    ex = T.load_examples(T.load_spec(spec_file), tmp_path)[0]
    assert ex.requests == (("Q: Is it?\nA:", " yes"), ("Q: Is it?\nA:", " no")) and ex.gold == 1
    spec_file.write_text("name: bad\nfile: x.jsonl\nfields: [q]\ncontext: x\n")
    with pytest.raises(DataError, match="exactly one of 'choices'"):
        T.load_spec(spec_file)
