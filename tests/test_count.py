"""`pythia-jax count`: counts equal a brute-force count over the rows `pythia-jax batches` saves."""

import collections
import os
import re

import numpy as np
import pytest

from pythia_jax.cli import main
from pythia_jax.data import count as count_lib
from pythia_jax.data.count import (
    CountError,
    CountSpec,
    NgramCounter,
    NumeralCounter,
    RunData,
    make_windows,
    merge_shards,
    read_table,
    run_count,
    shard_path,
)
from pythia_jax.data.indexed import write_indexed_dataset
from pythia_jax.data.tokenizer import decode, encode

SEQ, B, ITERS = 32, 4, 20
COMMON = ["--batch-size", str(B), "--seq-len", str(SEQ), "--seed", "1234", "--train-iters", str(ITERS)]
WORDS = ["the", "cat", "plus", "is", "and", "what", "times", "A:", "Q:", "x", "=", "3.5", "1,000",
         "5th", "(", ")", "the cat sat on the mat"]
TEXT_TERMS = ["cat", "the cat", "the cat sat on the mat", "7", "12"]
IDS_TERMS = [(encode(" plus")[0],), tuple(encode(" is 7"))]
REGEX = r"\d+ (?:plus|times) \d+"


def _random_doc(rng) -> str:
    parts = []
    for _ in range(int(rng.integers(3, 40))):
        if rng.random() < 0.4:
            parts.append(str(int(rng.integers(0, 20 if rng.random() < 0.7 else 200000))))
        else:
            parts.append(WORDS[int(rng.integers(len(WORDS)))])
    return " ".join(parts) + ("\n" if rng.random() < 0.3 else "")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A raw dataset (neox order) and its pre-shuffled copy (written by `pythia-jax preshuffle`)."""
    d = tmp_path_factory.mktemp("count")
    rng = np.random.default_rng(7)
    raw = write_indexed_dataset(str(d / "raw_text_document"),
                                [encode(_random_doc(rng)) + [0] for _ in range(150)])
    pre = str(d / "pre" / "document")
    assert main(["preshuffle", "--data", raw, "--out", pre, "--shards", "2"] + COMMON) == 0
    return {"neox": raw, "preshuffled": pre}


def _batches(prefix, order, start, stop, tmp_path):
    """Rows of steps [start, stop) as `pythia-jax batches` saves them."""
    out = str(tmp_path / f"rows-{order}-{start}-{stop}.npy")
    assert main(["batches", "--data", prefix, "--order", order, "--start", str(start),
                 "--end", str(stop - 1), "--out", out] + COMMON) == 0
    return np.load(out)


def _ref_ngram(rows, ids):
    """(count, [(row, offset)]) of ``ids`` inside each row, plain Python (overlaps included)."""
    n, hits = len(ids), []
    for r, row in enumerate(rows.tolist()):
        for p in range(len(row) - n + 1):
            if tuple(row[p:p + n]) == tuple(ids):
                hits.append((r, p))
    return len(hits), hits


def _ref_numerals(text, numeral_max=None):
    """The numeral rule written plainly: integers of 1-5 digits (not in a longer number, word,
    decimal or digit group), word = whitespace-separated run, neighbour 1-3 words away."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    ints = []
    for m in re.finditer(r"(?<![\w.,])\d{1,5}(?!\w|[.,]\d)", text):
        wi = [k for k, (s, e) in enumerate(words) if s <= m.start() < e][0]
        ints.append((wi, int(m.group(0)), m.start()))
    singles, pairs, where = collections.Counter(), collections.Counter(), []
    for i, (wi, v, off) in enumerate(ints):
        if any(1 <= abs(wi - wj) <= 3 for j, (wj, _, _) in enumerate(ints) if j != i):
            if numeral_max is None or v <= numeral_max:
                singles[str(v)] += 1
                where.append((str(v), off))
        for wj, u, _ in ints[i + 1:]:
            if 1 <= abs(wi - wj) <= 3 and (numeral_max is None or max(u, v) <= numeral_max):
                pairs[f"{min(u, v)} {max(u, v)}"] += 1
    return singles, pairs, where


def _by_window(table):
    out = collections.defaultdict(dict)
    for r in table:
        out[(r["window_start"], r["window_end"])][(r["term"], r["variant"])] = (r["count"],
                                                                                r["cumulative"])
    return out


@pytest.mark.parametrize("order", ["neox", "preshuffled"])
def test_counts_equal_brute_force_over_batches_rows(corpus, order, tmp_path):
    start, stop, window = 2, 17, 4
    out = str(tmp_path / "c.jsonl")
    args = ["count", "--data", corpus[order], "--order", order, "--start", str(start), "--stop",
            str(stop), "--window", str(window), "--regex", REGEX, "--preset", "numerals",
            "--locate", "--max-locations", "3", "--out", out, "--no-progress"] + COMMON
    for t in TEXT_TERMS:
        args += ["--text", t]
    for ids in IDS_TERMS:
        args += ["--ids", ",".join(map(str, ids))]
    assert main(args) == 0
    got = _by_window(read_table(out))
    assert list(got) == [(2, 6), (6, 10), (10, 14), (14, 17)]

    terms = [(t, "bare", encode(t)) for t in TEXT_TERMS] + [(t, "space", encode(" " + t))
                                                            for t in TEXT_TERMS]
    terms += [(",".join(map(str, ids)), "ids", list(ids)) for ids in IDS_TERMS]
    assert any(len(ids) > 4 for _, _, ids in terms)  # the long-term path is exercised
    cumulative = collections.Counter()
    ref_locations = collections.defaultdict(list)
    nonzero = collections.Counter()
    for a, b in got:
        rows = _batches(corpus[order], order, a, b, tmp_path)
        expect = collections.Counter()
        for t, v, ids in terms:
            n, hits = _ref_ngram(rows, ids)
            expect[(t, v)] = n
            ref_locations[(t, v)] += [(a + r // B, r % B, p, "token") for r, p in hits]
        for r, row in enumerate(rows):
            text = decode(row)
            expect[(REGEX, "regex")] += len(re.findall(REGEX, text))
            singles, pairs, where = _ref_numerals(text)
            expect.update({(k, "numeral"): n for k, n in singles.items()})
            expect.update({(k, "numeral_pair"): n for k, n in pairs.items()})
            for k, off in where:
                ref_locations[(k, "numeral")].append((a + r // B, r % B, off, "char"))
        cumulative.update(expect)
        window_rows = got[(a, b)]
        for key in set(expect) | set(window_rows):
            c, cum = window_rows.get(key, (0, 0))
            if key in window_rows or expect[key]:
                assert (c, cum) == (expect[key], cumulative[key]), (a, b, key)
        nonzero.update(k for k, n in expect.items() if n)
    # The corpus exercises every kind of term.
    for key in [("cat", "space"), ("the cat", "bare"), ("the cat sat on the mat", "space"),
                (REGEX, "regex"), ("7", "numeral"), (",".join(map(str, IDS_TERMS[0])), "ids")]:
        assert nonzero[key] > 0, key
    assert sum(1 for k in nonzero if k[1] == "numeral_pair") > 5

    locs = read_table(str(tmp_path / "c.locations.jsonl"))
    by_key = collections.defaultdict(list)
    for r in locs:
        by_key[(r["term"], r["variant"])].append((r["step"], r["row_in_step"], r["offset"],
                                                  r["offset_unit"]))
    for key, hits in ref_locations.items():
        if key[1] in ("bare", "space", "ids", "numeral"):
            assert by_key.get(key, []) == hits[:3], key


def test_ngram_counter_random_arrays():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 6, size=(7, 50)).astype(np.uint16)
    rows[3, 10:16] = [1, 2, 3, 4, 5, 1]
    terms = [(f"t{k}", "ids", tuple(int(x) for x in rng.integers(0, 6, size=n)))
             for k, n in enumerate([1, 1, 2, 2, 3, 4, 5, 5, 6])]
    terms += [("dup", "ids", terms[2][2]), ("long", "ids", (1, 2, 3, 4, 5, 1)),
              ("absent", "ids", (60000, 1))]
    c = NgramCounter(terms)
    counts = c.count(rows)
    locs = c.locate(rows, None, limit=10 ** 6)
    for t, v, ids in terms:
        n, hits = _ref_ngram(rows, ids)
        assert counts.get((t, v), 0) == n, t
        assert [(r, p) for tt, vv, r, p in locs if (tt, vv) == (t, v)] == hits
    assert counts[("long", "ids")] >= 1
    # n-grams never span rows: a term across the row edge is not found.
    edge = np.array([[0, 0, 9], [8, 0, 0]], dtype=np.uint16)
    assert NgramCounter([("e", "ids", (9, 8))]).count(edge) == {}


def test_numeral_rule_examples():
    c = NumeralCounter()
    got = c.count(None, ["Q: What is 24 plus 18? A: 42", "pi 3.14 and 1,000 and 5th 7",
                         "1 2", "99999 100000 x 5", "07 x y 7", "0 x y z 8"])
    assert got == {("24", "numeral"): 1, ("18", "numeral"): 1, ("42", "numeral"): 1,
                   ("18 24", "numeral_pair"): 1, ("18 42", "numeral_pair"): 1,
                   ("1", "numeral"): 1, ("2", "numeral"): 1, ("1 2", "numeral_pair"): 1,
                   ("99999", "numeral"): 1, ("5", "numeral"): 1, ("5 99999", "numeral_pair"): 1,
                   ("7", "numeral"): 2, ("7 7", "numeral_pair"): 1}
    assert NumeralCounter(numeral_max=20).count(None, ["3 40 5"]) == {
        ("3", "numeral"): 1, ("5", "numeral"): 1, ("3 5", "numeral_pair"): 1}


def test_numeral_max_lists_every_number_up_to_it_and_term_frequency_reads_only_tables_from_step_0(
        corpus, tmp_path):
    """With --numeral-max M every number 0..M has a row in every window, zeros included, so the
    table says what was counted; term-frequency refuses a table from --start > 0 and operands
    above M instead of reading them as count 0."""
    from pythia_jax.analysis.term_frequency import operand_counts
    from pythia_jax.errors import DataError

    run = RunData(corpus["neox"], "neox", SEQ, B, 1234, ITERS)
    spec = CountSpec(numerals=True, numeral_max=30)
    out = str(tmp_path / "n.csv")
    run_count(run, spec, out, start=0, stop=8, at_steps=[4, 8], progress=False)
    table = read_table(out)
    for w in ((0, 4), (4, 8)):
        listed = {r["term"] for r in table if (r["window_start"], r["window_end"]) == w
                  and r["variant"] == "numeral"}
        assert listed == {str(v) for v in range(31)}, w
    counts = operand_counts(table, [4, 8], range(31))
    never = [x for x in range(31) if counts[8][x] == 0]
    assert never and counts[8][7] > 0  # some numbers never occur: listed with count 0
    with pytest.raises(DataError, match=r"operand\(s\) 31, 32, .* have no 'numeral' row"):
        operand_counts(table, [4, 8], range(40))
    late = str(tmp_path / "late.csv")
    run_count(run, spec, late, start=4, stop=8, progress=False)
    with pytest.raises(DataError, match=r"first window starts at step 4, not 0"):
        operand_counts(read_table(late), [8], range(31))


def test_make_windows():
    assert make_windows(0, 10, window=4) == [(0, 4), (4, 8), (8, 10)]
    assert make_windows(0, 16, at_steps=[0, 1, 2, 4, 8]) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16)]
    assert make_windows(3, 5) == [(3, 5)]
    with pytest.raises(CountError, match="outside the counted steps"):
        make_windows(4, 10, at_steps=[2, 8])


def _spec():
    return CountSpec(texts=("cat", "the cat"), regexes=(r"\d+",), per_match=True, numerals=True,
                     locate=True, max_locations=2)


@pytest.mark.parametrize("order", ["neox", "preshuffled"])
def test_hosts_merge_to_the_single_host_table(corpus, order, tmp_path):
    run = RunData(corpus[order], order, SEQ, B, 1234, ITERS)
    kw = dict(start=1, stop=19, window=2, progress=False, chunk_steps=1)
    single = str(tmp_path / "one.csv")
    run_count(run, _spec(), single, **kw)
    want = open(single).read(), open(count_lib.locations_path(single)).read()
    assert len(want[0].splitlines()) > 20 and not os.path.exists(single + ".parts")
    for hosts in (2, 4):
        shards = []
        for i in range(hosts):
            out = str(tmp_path / f"h{hosts}.csv")
            assert run_count(run, _spec(), out, num_hosts=hosts, host_index=i, **kw) == {
                "shard": shard_path(out, hosts, i)}
            shards.append(shard_path(out, hosts, i))
        merged = str(tmp_path / f"merged{hosts}.csv")
        if hosts == 2:
            with pytest.raises(CountError, match=r"windows are missing, first \[3, 5\) \(host 1 of 2\)"):
                merge_shards(shards[:1], merged)
            with pytest.raises(CountError, match="also in another shard"):
                merge_shards(shards + shards[:1], merged)
            assert main(["count-merge", "--out", merged] + shards[::-1]) == 0
        else:
            merge_shards(shards, merged)
        assert (open(merged).read(), open(count_lib.locations_path(merged)).read()) == want
    if order == "neox":  # local processes give the same table
        par = str(tmp_path / "par.csv")
        run_count(run, _spec(), par, workers=2, **kw)
        assert open(par).read() == want[0]


def test_interrupted_count_resumes_to_the_same_table(corpus, tmp_path, monkeypatch):
    run = RunData(corpus["neox"], "neox", SEQ, B, 1234, ITERS)
    kw = dict(start=0, stop=12, window=2, progress=False, chunk_steps=1)
    clean = str(tmp_path / "clean.jsonl")
    run_count(run, _spec(), clean, **kw)

    calls = []
    real = count_lib.runner._count_chunk

    def flaky(task):
        calls.append(task)
        if len(calls) == 7:  # windows of 2 steps, 1-step chunks: 3 windows finish first
            raise RuntimeError("injected failure")
        return real(task)

    monkeypatch.setattr(count_lib.runner, "_count_chunk", flaky)  # where run_count looks it up
    out = str(tmp_path / "c.jsonl")
    with pytest.raises(RuntimeError, match="injected"):
        run_count(run, _spec(), out, **kw)
    assert not os.path.exists(out)
    parts = sorted(os.listdir(out + ".parts"))
    assert parts == ["manifest.json", "window-000000000-000000002.json",
                     "window-000000002-000000004.json", "window-000000004-000000006.json"]
    with pytest.raises(CountError, match="pass --resume to continue"):
        run_count(run, _spec(), out, **kw)
    with pytest.raises(CountError, match="different 'windows'"):
        run_count(run, _spec(), out, resume=True, **dict(kw, window=3))
    calls.clear()
    run_count(run, _spec(), out, resume=True, **kw)
    assert sorted({t[2] for t in calls}) == list(range(6, 12))  # only the unfinished windows
    assert open(out).read() == open(clean).read()
    assert open(count_lib.locations_path(out)).read() == open(count_lib.locations_path(clean)).read()


@pytest.mark.parametrize("extra, message", [
    ([], "nothing to count: give --text, --ids, --terms-file, --regex or --preset numerals"),
    (["--regex", "(a"], "--regex '(a' does not compile: missing ), unterminated subpattern"),
    (["--text", "cat", "--stop", "500"], "steps [0, 500) need rows up to 2,000, the neox order has"),
    (["--text", "cat", "--window", "0"], "--window 0: a window must be at least 1 step"),
    (["--text", "cat", "--at-steps", "1,x"], "--at-steps '1,x': expected comma-separated steps"),
    (["--ids", "1,,2"], "--ids '1,,2': expected comma-separated token ids"),
    (["--text", "cat", "--out", "c.txt"], "expected a .jsonl or .csv file name"),
])
def test_bad_input_is_one_line_and_writes_nothing(corpus, tmp_path, capsys, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)  # restored afterwards: other tests read configs/ from the repo root
    args = ["count", "--data", corpus["neox"], "--order", "neox", "--no-progress"] + COMMON
    if "--out" not in extra:
        args += ["--out", "c.jsonl"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_resume(corpus, tmp_path, capsys):
    out = tmp_path / "c.csv"
    out.write_text("keep me\n")
    args = ["count", "--data", corpus["neox"], "--order", "neox", "--text", "cat", "--out",
            str(out), "--no-progress"] + COMMON
    # another file is refused as such, with or without --resume (it said "pass --resume" first,
    # then refused the --resume)
    for extra in ([], ["--resume"]):
        assert main(args + extra) == 2
        assert "c.csv exists and is an unrelated file, not a count table" in capsys.readouterr().err
        assert out.read_text() == "keep me\n" and sorted(os.listdir(tmp_path)) == ["c.csv"]
    out.unlink()
    assert main(args) == 0
    table = out.read_text()
    assert main(args) == 2  # a count table needs --resume to be redone
    assert "c.csv already exists; pass --resume" in capsys.readouterr().err
    assert table.startswith("window_start,window_end,term,variant,count,cumulative\n")
    assert main(args + ["--resume"]) == 0 and out.read_text() == table
    # ... but only the same count: a table of other terms is not replaced by --resume
    other = [a if a != "cat" else "dog" for a in args]
    assert main(other + ["--resume"]) == 2
    assert "is a finished count of other terms ('cat' bare is in it, not in this count)" in capsys.readouterr().err
    assert out.read_text() == table


def test_byte_decoder_equals_the_tokenizer():
    from pythia_jax.data.count import decode_rows
    from pythia_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    every_id = np.arange(1 << 16, dtype=np.uint16)[:, None]  # includes ids beyond the vocabulary
    assert decode_rows(every_id) == tok.decode_batch([[i] for i in range(1 << 16)],
                                                     skip_special_tokens=False)
    rng = np.random.default_rng(3)  # random ids: split UTF-8 sequences, special tokens, spaces
    rows = rng.integers(0, 50277, size=(64, 97)).astype(np.uint16)
    rows[:, ::7] = rng.choice([0, 1, 50254, 50276, 187, 209], size=rows[:, ::7].shape)
    assert decode_rows(rows) == tok.decode_batch([r.tolist() for r in rows],
                                                 skip_special_tokens=False)
    assert decode_rows(rows[:0]) == []


def test_regex_and_numeral_locations_name_the_token_too():
    """--locate gives the character offset of a regex / numeral match and the token holding it."""
    import numpy as np

    from pythia_jax.data import count as cnt
    from pythia_jax.data.tokenizer import decode, encode

    text = "Héllo wörld: Paris has 12 cats and 7 dogs; Paris again"
    row = np.asarray(encode(text), dtype=np.uint16)[None, :]
    counters = cnt.build_counters(cnt.CountSpec(regexes=("Paris",), numerals=True, locate=True))
    _, locs = cnt.count_rows(counters, row, locate=True)
    assert locs, "no locations"
    for _term, _variant, _r, off, unit, tok in locs:
        assert unit == "char"
        pieces = [decode(row[0][: i + 1]) for i in range(len(row[0]))]
        # the token holding character `off` is the first whose prefix decode reaches past it
        assert len(pieces[tok]) > off and (tok == 0 or len(pieces[tok - 1]) <= off)
    paris = [loc for loc in locs if loc[0] == "Paris"]
    assert [loc[3] for loc in paris] == [m.start() for m in __import__("re").finditer("Paris", text)]


def test_interrupted_publication_leaves_neither_the_table_nor_the_locations(corpus, tmp_path, monkeypatch):
    """The table and its locations are published together: an interruption (Ctrl-C) while they
    are renamed into place leaves neither (the finished windows stay for --resume)."""
    run = RunData(corpus["neox"], "neox", SEQ, B, 1234, ITERS)
    out = str(tmp_path / "ci.csv")
    real, calls = os.rename, []

    def rename(a, b, *args, **kw):
        if os.fspath(b) in (out, count_lib.locations_path(out)):
            calls.append(b)
            if len(calls) == 2:  # one of the two is in place, the other not yet
                raise KeyboardInterrupt
        return real(a, b, *args, **kw)

    monkeypatch.setattr(os, "rename", rename)  # the publication renames with os.rename
    with pytest.raises(KeyboardInterrupt):
        run_count(run, _spec(), out, start=0, stop=6, window=2, progress=False)
    monkeypatch.undo()
    assert len(calls) == 2 and sorted(os.listdir(tmp_path)) == ["ci.csv.parts"]
    run_count(run, _spec(), out, start=0, stop=6, window=2, progress=False, resume=True)
    assert sorted(os.listdir(tmp_path)) == ["ci.csv", "ci.locations.csv"]
    assert read_table(count_lib.locations_path(out)) and read_table(out)


def test_outputs_that_are_folders_or_other_files_are_refused_before_counting(corpus, tmp_path, capsys):
    out = tmp_path / "c.csv"
    args = ["count", "--data", corpus["neox"], "--order", "neox", "--text", "cat", "--locate", "--out",
            str(out), "--no-progress"] + COMMON
    (tmp_path / "c.locations.csv").mkdir()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"output {tmp_path / 'c.locations.csv'} exists and is an empty folder, not a count "
                        "table (.jsonl/.csv of 'pythia-jax count', its locations or a host shard); refusing "
                        "to replace it: choose another output path"), err
    (tmp_path / "c.locations.csv").rmdir()
    out.mkdir()
    assert main(args + ["--resume"]) == 2
    assert f"output {out} exists and is an empty folder, not a count table" in capsys.readouterr().err
    out.rmdir()
    (tmp_path / "c.csv.parts").write_text("x")
    assert main(args) == 2
    assert "c.csv.parts (where a count keeps its finished windows) is an unrelated file, not a folder" in \
        capsys.readouterr().err
    (tmp_path / "c.csv.parts").unlink()
    assert sorted(os.listdir(tmp_path)) == []
    # count-merge --overwrite replaces a count table, not a folder
    run = RunData(corpus["neox"], "neox", SEQ, B, 1234, ITERS)
    shard = str(tmp_path / "h.csv")
    shards = [run_count(run, _spec(), shard, start=0, stop=4, num_hosts=2, host_index=i, progress=False)["shard"]
              for i in range(2)]
    merged = tmp_path / "m.csv"
    merged.mkdir()
    (merged / "keep").write_text("keep")
    assert main(["count-merge", "--overwrite", "--out", str(merged)] + shards) == 2
    assert "exists and is a folder of 1 other entries (keep), not a count table" in capsys.readouterr().err
    assert (merged / "keep").read_text() == "keep"
    assert main(["count-merge", "--out", str(tmp_path / "m2.csv")] + shards) == 0
    assert main(["count-merge", "--overwrite", "--out", str(tmp_path / "m2.csv")] + shards) == 0


def test_a_regex_that_can_match_the_empty_string_is_warned_about(caplog):
    """'x*' counted an empty match at every position without a word; anchors such as '^' count
    empty matches on purpose. Both are counted, with a warning."""
    from pythia_jax.data.count.counters import compile_regex

    for pattern in ("x*", r"\b\d*", "(?m)^$", "^"):
        caplog.clear()
        with caplog.at_level("WARNING"):
            compile_regex(pattern)
        assert f"--regex {pattern!r} can match the empty string" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        compile_regex("x+")
    assert caplog.text == ""
