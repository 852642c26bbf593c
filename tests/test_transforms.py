"""Row transforms: the three gender swaps give exactly the documented results; the pipeline
applies a transform only inside its step window and leaves the order untouched."""

import numpy as np
import pytest

from pythia_jax.config import ConfigError
from pythia_jax.data.tokenizer import decode, encode, load_tokenizer
from pythia_jax.data.transforms import (
    TEXT_REPLACEMENTS_2023,
    TOKENMAP_2022,
    TransformError,
    TransformSpec,
    apply_to_rows,
    available_transforms,
    build_transform,
    winobias_pairs,
)


def row_of(text: str, dtype=np.uint16) -> np.ndarray:
    return np.asarray(encode(text), dtype=dtype)


def swapped(name: str, text: str, **params) -> str:
    row = row_of(text)
    out = build_transform(name, params)(row)
    assert out.shape == row.shape and out.dtype == row.dtype
    return decode(out)


def test_registry_lists_the_builtins():
    assert {"gender_swap", "gender_swap_tokenmap_2022",
            "gender_swap_text_2023"} <= set(available_transforms())


# ---------------------------------------------------------------------------------- token map
def test_tokenmap_changes_exactly_its_ten_ids():
    rng = np.random.default_rng(0)
    others = rng.integers(2, 50000, 500)
    row = np.concatenate([list(TOKENMAP_2022), [15101, 2994], others]).astype(np.uint16)
    out = build_transform("gender_swap_tokenmap_2022")(row)
    expected = np.array([TOKENMAP_2022.get(int(t), int(t)) for t in row], dtype=np.uint16)
    np.testing.assert_array_equal(out, expected)
    assert len(TOKENMAP_2022) == 10
    # ' Him' (15101) and ' himself' (2994) are missed, as in the original
    assert (out[10:12] == [15101, 2994]).all()
    # words built from the sub-word ids ('he' 248, 'his' 8701, 'him' 13243) are corrupted too
    assert encode("(he)") == [9, 248, 10]
    assert swapped("gender_swap_tokenmap_2022", "x (he) said") == "x (she) said"


def test_tokenmap_examples():
    assert swapped("gender_swap_tokenmap_2022", "x He said he saw him with his dog") == \
        "x She said she saw her with her dog"
    assert swapped("gender_swap_tokenmap_2022", "x Him himself") == "x Him himself"


# ---------------------------------------------------------------------------------- text 2023
def _text_2023_reference(row: np.ndarray) -> np.ndarray:
    tok = load_tokenizer()
    text = tok.decode([int(t) for t in row], skip_special_tokens=False)
    for old, new in [(" he ", " she "), (" him ", " her "), (" his ", " her "),
                     (" He ", " She "), (" Him ", " Her "), (" His ", " Her ")]:
        text = text.replace(old, new)
    ids = tok.encode(text).ids[: len(row)]
    return np.asarray(ids + [1] * (len(row) - len(ids)), dtype=row.dtype)


def test_text_2023_swaps_only_space_delimited_forms():
    assert TEXT_REPLACEMENTS_2023[0] == (" he ", " she ")
    out = swapped("gender_swap_text_2023",
                  "x he said he. His dog saw him, himself and Him there")
    assert out == "x she said he. Her dog saw him, himself and Her there"


def test_text_2023_pads_and_truncates_like_the_original():
    # ' s' + 'he' decodes to " she", which re-tokenizes into one token: one pad id at the end
    row = np.array(encode("x") + [256, 248] + encode(" went home"), dtype=np.uint16)
    out = build_transform("gender_swap_text_2023")(row)
    np.testing.assert_array_equal(out, _text_2023_reference(row))
    assert out[-1] == 1 and decode(out[:-1]) == "x she went home"
    # a row whose re-tokenization is longer is cut to the row's length
    row = np.array(encode("x his ") + [7], dtype=np.uint16)
    np.testing.assert_array_equal(build_transform("gender_swap_text_2023")(row),
                                  _text_2023_reference(row))


# ---------------------------------------------------------------------------------- corrected
CORRECTED = [
    ("x He said he saw him with his dog.", "x She said she saw her with her dog."),
    ("x HE and HIM and HIS", "x SHE and HER and HER"),
    ("x (he) \"He\" [him] he's his. his, him; him! his? He—", "x (she) \"She\" [her] she's her. her, "
     "her; her! her? She—"),
    ("x He blamed himself. Him too.", "x She blamed herself. Her too."),
    ("x the there them hero ethics Hellen Hiss Heather hisself", "x the there them hero ethics "
     "Hellen Hiss Heather hisself"),
    ("x he\nHe\the", "x she\nShe\tshe"),
]


@pytest.mark.parametrize("text,expected", CORRECTED)
def test_corrected_swap_fixed_sentences(text, expected):
    row = row_of(text)
    out = build_transform("gender_swap")(row)
    assert decode(out) == expected
    assert len(out) == len(row) and out.dtype == row.dtype


def test_corrected_swap_changes_only_the_pronoun_tokens():
    text = "x The hero and the ethics of Hellen: he told Hiss there."
    row = row_of(text)
    out = build_transform("gender_swap")(row)
    changed = np.flatnonzero(out != row)
    assert [decode(row[i:i + 1]) for i in changed] == [" he"]
    assert decode(out[changed]) == " she"


def test_corrected_swap_keeps_the_length_when_the_new_word_needs_more_tokens():
    # ' Himself' is one token, ' Herself' two ([' Hers', 'elf']): the rest of the row shifts
    # right by one and the last token drops (the row keeps its length, the text is exact)
    text = "x Himself said so and more"
    row = row_of(text)
    swap = build_transform("gender_swap")
    out = swap(row)
    assert len(out) == len(row)
    assert decode(out) == "x Herself said so and"
    assert swap.fn.dropped == 1
    skip = build_transform("gender_swap", {"overflow": "skip"})
    assert decode(skip(row)) == text and skip.skipped == 1


def test_corrected_swap_uses_non_canonical_splits_when_the_new_word_is_shorter():
    # ' HIMSELF' is three tokens; ' HERSELF' gets exactly three
    row = row_of("x HIMSELF ok")
    out = build_transform("gender_swap")(row)
    assert decode(out) == "x HERSELF ok" and len(out) == len(row)


def test_row_start_is_not_a_word_boundary():
    # the row may begin inside a word of the previous row: a match at byte 0 is left alone
    assert swapped("gender_swap", "he said") == "he said"
    assert swapped("gender_swap", " he said") == " she said"


def test_reverse_direction_and_word_lists():
    assert swapped("gender_swap", "x She told her about hers and herself",
                   direction="f2m") == "x He told his about his and himself"
    assert swapped("gender_swap", "x She saw her", direction="f2m", her_to="him") == "x He saw him"
    pairs = winobias_pairs()
    assert pairs["actor"] == "actress" and pairs["cameramen"] == "camerawomen"
    assert pairs["husband"] == "wife" and "he" not in pairs
    assert swapped("gender_swap", "x The actor and his brother met the King",
                   word_pairs="winobias") == "x The actress and her sister met the Queen"
    assert swapped("gender_swap", "x The actress and her sister", direction="f2m",
                   word_pairs="winobias") == "x The actor and his brother"


# ------------------------------------------------------------------------------- registry / bad
def test_user_transform_by_import_path():
    row = row_of("x a b c")
    np.testing.assert_array_equal(build_transform("numpy:flip")(row), row[::-1])


def test_bad_transforms_are_refused_with_one_line():
    with pytest.raises(ConfigError, match="unknown transform 'gender_swapp'.*gender_swap"):
        build_transform("gender_swapp")
    with pytest.raises(ConfigError, match="cannot import"):
        build_transform("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="bad parameters"):
        build_transform("gender_swap", {"colour": 1})
    with pytest.raises(ConfigError, match="direction must be"):
        build_transform("gender_swap", {"direction": "sideways"})
    row = row_of("x a b c")
    with pytest.raises(TransformError, match="changed the row from uint16.*to float64"):
        build_transform("numpy:float64")(row)
    with pytest.raises(TransformError, match="keep the row's length"):
        build_transform("numpy:append", {"values": [1]})(row)
    with pytest.raises(TransformError, match="returned list"):
        build_transform("builtins:list")(row)
    # a transform that raises: one line naming it (it was a traceback out of the data pipeline)
    with pytest.raises(TransformError, match=r"transform 'numpy:reshape' raised ValueError: cannot reshape") as info:
        build_transform("numpy:reshape", {"shape": [7, 7]})(row)
    assert isinstance(info.value.__cause__, ValueError)


def test_a_raising_transform_stops_the_pipeline_with_one_line(tmp_path):
    from pythia_jax.data import demo_data_prefix
    from pythia_jax.data.pipeline import make_train_iterator

    spec = TransformSpec.create("numpy:reshape", {"shape": [7, 7]}, steps=(1, 3))
    it = make_train_iterator(demo_data_prefix(), transform=spec, order="neox", seq_len=128, global_batch=4,
                             seed=1234, train_iters=4, process_index=0, process_count=1,
                             cache_prefix=str(tmp_path / "maps"))
    next(it)  # step 0: outside the window
    with pytest.raises(TransformError, match="transform 'numpy:reshape' raised ValueError"):
        next(it)


def test_spec_window_and_record():
    spec = TransformSpec.create("gender_swap", {"direction": "m2f"}, (5, 9))
    assert [s for s in range(12) if spec.applies_to(s)] == [5, 6, 7, 8]
    assert TransformSpec.from_dict(spec.to_dict()) == spec
    spec.check_within(9)
    with pytest.raises(ConfigError, match=r"reach beyond the run's 8 steps"):
        spec.check_within(8)
    for bad in [(3, 3), (-1, 2), (1,)]:
        with pytest.raises(ConfigError, match="transform_steps"):
            TransformSpec.create("gender_swap", steps=bad)


def test_apply_to_rows_counts_what_changed():
    a, b = row_of("x he and he ok"), row_of("x nothing at all ok")
    n = min(len(a), len(b))
    rows = np.stack([a[:n], b[:n]])
    out, stats = apply_to_rows(rows, build_transform("gender_swap"))
    assert (stats.rows_changed, stats.tokens_changed) == (1, 2)
    assert decode(out[0]) == decode(rows[0]).replace(" he", " she")
    np.testing.assert_array_equal(out[1], rows[1])


def test_pipeline_applies_only_inside_the_window_and_keeps_the_order(tmp_path):
    from pythia_jax.data import demo_data_prefix
    from pythia_jax.data.pipeline import make_train_iterator
    from pythia_jax.errors import DataError

    kw = dict(order="neox", seq_len=128, global_batch=8, seed=1234, train_iters=12,
              process_index=0, process_count=1, cache_prefix=str(tmp_path / "maps"))
    spec = TransformSpec.create("gender_swap", steps=(3, 7))
    it = make_train_iterator(demo_data_prefix(), transform=spec, **kw)
    plain = make_train_iterator(demo_data_prefix(), **kw)
    swap = spec.build()
    changed_steps = []
    for step in range(12):
        got, ref = next(it), next(plain)
        stats = it.pop_transform_stats(step)
        if not spec.applies_to(step):
            assert stats is None
            np.testing.assert_array_equal(got["inputs"], ref["inputs"])
            np.testing.assert_array_equal(got["labels"], ref["labels"])
            continue
        rows = np.concatenate([ref["inputs"], ref["labels"][:, -1:]], axis=1)
        expected = np.stack([swap(r) for r in rows])
        np.testing.assert_array_equal(got["inputs"], expected[:, :-1])
        assert stats.tokens_changed == int((expected != rows).sum())
        if stats.rows_changed:
            changed_steps.append(step)
    assert changed_steps  # the demo text has pronouns in the window
    # a checkpointed state made with another transform (or none) is refused on resume
    state = plain.get_state()
    fresh = make_train_iterator(demo_data_prefix(), transform=spec, **kw)
    with pytest.raises(DataError, match="made with transform None.*same transform"):
        fresh.set_state(state)
    with pytest.raises(ConfigError, match="beyond the run's 12 steps"):
        make_train_iterator(demo_data_prefix(), transform=TransformSpec.create(
            "gender_swap", steps=(5, 20)), **kw)


def test_batches_shows_the_transformed_rows(tmp_path):
    import subprocess
    import sys

    base = [sys.executable, "-m", "pythia_jax.cli", "batches", "--data", "demo", "--order", "neox",
            "--batch-size", "8", "--seq-len", "128", "--train-iters", "200", "--start", "100",
            "--end", "101"]
    env_cache = {"PYTHIA_JAX_CACHE": str(tmp_path)}
    import os
    env = {**os.environ, **env_cache}
    out = subprocess.run(base + ["--transform", "gender_swap", "--transform-steps", "101,102",
                                 "--decode"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "step 100:" not in out.stdout and "step 101: gender_swap changed" in out.stdout
    assert " [his→her]" in out.stdout
    npy = tmp_path / "rows.npy"
    plain = tmp_path / "plain.npy"
    assert subprocess.run(base + ["--transform", "gender_swap", "--out", str(npy)], env=env,
                          capture_output=True).returncode == 0
    assert subprocess.run(base + ["--out", str(plain)], env=env, capture_output=True).returncode == 0
    got, ref = np.load(npy), np.load(plain)
    swap = build_transform("gender_swap")
    np.testing.assert_array_equal(got, np.stack([swap(r) for r in ref]))
    bad = subprocess.run(base + ["--transform", "nope"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown transform 'nope'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run(base + ["--transform", "gender_swap", "--transform-steps", "150,300"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "beyond the run's 200 steps" in bad.stderr
