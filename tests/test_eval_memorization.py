"""Memorization finds exactly the rows a tiny model was trained to memorise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pythia_jax.config import ModelConfig
from pythia_jax.errors import DataError
from pythia_jax.eval.memorization import ROW_DTYPE, evaluate_memorization, memorization_scores, select_rows

CFG = ModelConfig(name="tiny", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                  max_position_embeddings=64)
SEQ_LEN = 64
N_ROWS = 8
TRAINED = [1, 2, 5, 6]  # rows the model is trained on; the others are never seen


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, row tokens [8, 65], data prefix): a tiny model trained on rows TRAINED only."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from pythia_jax.data.indexed import write_indexed_dataset
    from pythia_jax.model import GPTNeoX

    rng = np.random.default_rng(0)
    rows = rng.integers(2, CFG.vocab_size, (N_ROWS, SEQ_LEN + 1)).astype(np.int64)
    prefix = str(tmp_path_factory.mktemp("mem") / "train")
    write_indexed_dataset(prefix, list(rows))  # pre-shuffled layout: row j = item j

    model = GPTNeoX(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)
    batch = jnp.asarray(rows[TRAINED])

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in range(300):
        params, opt_state, loss = step(params, opt_state)
    assert float(loss) < 0.05, float(loss)
    return nnx.merge(graphdef, params), rows, prefix


def test_finds_exactly_the_trained_rows(setup):
    from pythia_jax.data.orders import open_order
    from pythia_jax.eval.generate import Generator

    model, rows, prefix = setup
    order = open_order(prefix, "preshuffled", seq_len=SEQ_LEN)
    gen = Generator(model, batch_size=8)
    # rows_per_step 2: checkpoint step 4 has seen rows [0, 8)
    res = evaluate_memorization(gen, order, 4, batch_size=2)
    assert res.per_row["row"].tolist() == list(range(8))
    assert np.nonzero(res.per_row["memorized"])[0].tolist() == TRAINED
    assert (res.per_row["matched"][TRAINED] == 32).all()
    summary = res.summary()
    assert summary["memorized"][0] == 0.5 and summary["num_memorized"][0] == 4
    # step 2 has seen rows [0, 4): rows 1 and 2 of them are memorized
    res2 = evaluate_memorization(gen, order, 2, batch_size=2)
    assert np.nonzero(res2.per_row["memorized"])[0].tolist() == [1, 2]
    # the direct API on token arrays agrees
    direct = memorization_scores(gen, rows[:, :64])
    assert direct.per_row["memorized"].tolist() == res.per_row["memorized"].tolist()


def test_runner_memorization_over_checkpoints(setup, tmp_path):
    """Across checkpoints: per-row .npy files and one summary row per step in the table."""
    from pythia_jax.checkpoint import save_params_checkpoint
    from pythia_jax.eval.runner import EvalSettings, evaluate_checkpoints
    from pythia_jax.model import params_to_dict

    model, _, prefix = setup
    ckpt = tmp_path / "ckpt"
    for s in (0, 2, 4):
        save_params_checkpoint(ckpt, s, CFG, params_to_dict(model))
    settings = EvalSettings(tasks=["memorization"], mem_data=prefix, mem_order="preshuffled", mem_seq_len=SEQ_LEN,
                            mem_rows_per_step=2, details_dir=str(tmp_path / "details"), progress=False)
    out = tmp_path / "mem.jsonl"
    evaluate_checkpoints(ckpt, [0, 2, 4], settings, out, log=lambda _: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(r["step"], r["metric"]): r["value"] for r in rows}
    assert got[(2, "num_memorized")] == 2 and got[(4, "num_memorized")] == 4
    assert got[(4, "memorized")] == 0.5 and got[(0, "num_memorized")] == 0
    per_row = np.load(tmp_path / "details" / "step4_memorization.npy")
    assert per_row.dtype == ROW_DTYPE and per_row["memorized"].sum() == 4


def test_select_rows():
    assert select_rows(3, batch_size=4).tolist() == list(range(12))
    s = select_rows(100, batch_size=1024, sample=50, seed=1)
    assert len(s) == 50 and len(set(s.tolist())) == 50 and s.max() < 102400
    assert (s == select_rows(100, batch_size=1024, sample=50, seed=1)).all()
    assert select_rows(0, batch_size=1024).size == 0
    with pytest.raises(DataError, match="has only 8"):
        select_rows(5, batch_size=2, num_rows=8)


def test_rows_too_short(setup):
    from pythia_jax.eval.generate import Generator

    with pytest.raises(DataError, match="at least 64 tokens"):
        memorization_scores(Generator(setup[0]), np.zeros((2, 40), np.int64))


def test_rows_with_ids_outside_vocab_refused(setup):
    """Rows of a dataset made for a larger vocabulary (prompt or true continuation) are refused."""
    from pythia_jax.errors import TokenIdError
    from pythia_jax.eval.generate import Generator

    rows = np.ones((2, 64), np.int64)
    rows[1, 40] = CFG.vocab_size  # in the continuation only
    with pytest.raises(TokenIdError, match=r"token ids of the memorization rows lie outside the model's "
                                           r"vocabulary: ids from 1 to 128, but vocab_size is 128"):
        memorization_scores(Generator(setup[0]), rows)


def test_scores_equal_hf_greedy_generation_per_token_accuracy(tmp_path):
    """Per-row scores = HF PyTorch greedy generation's per-token accuracy on the same rows and
    weights (transformers GPTNeoXForCausalLM.generate, do_sample=False, never stopping at EOS)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from pythia_jax.convert.hf import read_hf_dir
    from pythia_jax.eval.generate import Generator
    from pythia_jax.eval.runtime import place_model

    cfg = ModelConfig(name="tiny-hf", vocab_size=101, hidden_size=32, num_layers=2, num_heads=4,
                      max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**cfg.to_hf_dict()))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf = hf.float().eval()
    hf.save_pretrained(tmp_path / "hf")
    config, params = read_hf_dir(tmp_path / "hf")
    gen = Generator(place_model(params, config=config), batch_size=8)

    rng = np.random.default_rng(3)
    n = 12
    prompts = rng.integers(0, cfg.vocab_size, (n, 32))
    hf.generation_config.eos_token_id = None  # the score never stops early
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(prompts), attention_mask=torch.ones(n, 32, dtype=torch.long),
                          do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=1,
                          use_cache=True).numpy()[:, 32:]
    assert out.shape == (n, 32)
    truth = out.copy()  # the true continuation: HF's own greedy tokens, k of them changed in row k
    for i in range(n):
        pos = rng.choice(32, size=min(i * 3, 32), replace=False)
        truth[i, pos] = (truth[i, pos] + 1 + rng.integers(0, cfg.vocab_size - 1, len(pos))) % cfg.vocab_size
    hf_accuracy = (out == truth).mean(axis=1)
    res = memorization_scores(gen, np.concatenate([prompts, truth], axis=1))
    np.testing.assert_array_equal(res.per_row["score"], hf_accuracy.astype(np.float32))
    assert res.per_row["memorized"].tolist() == (hf_accuracy == 1).tolist()
    assert len(set(hf_accuracy.tolist())) > 5  # scores spread over many values k/32


def test_memorization_parts_of_other_weights_are_refused(setup, tmp_path):
    """Chunks scored from one checkpoint are never reused for another: the parts manifest names
    the weights (a copy of run A's parts beside run B's step is refused, not read back as B's
    scores), and parts of a version that did not name them are refused too."""
    import shutil

    from flax import nnx

    from pythia_jax.checkpoint import save_params_checkpoint
    from pythia_jax.eval import memorization as M
    from pythia_jax.eval.provenance import ProvenanceError
    from pythia_jax.eval.runner import EvalSettings, evaluate_checkpoints
    from pythia_jax.model import GPTNeoX, params_to_dict

    model, _, prefix = setup
    save_params_checkpoint(tmp_path / "a", 4, CFG, params_to_dict(model))  # memorized TRAINED
    save_params_checkpoint(tmp_path / "b", 4, CFG, params_to_dict(GPTNeoX(CFG, rngs=nnx.Rngs(1))))

    def settings(details):
        return EvalSettings(tasks=["memorization"], mem_data=prefix, mem_order="preshuffled",
                            mem_seq_len=SEQ_LEN, mem_rows_per_step=2, details_dir=str(details), progress=False)

    evaluate_checkpoints(tmp_path / "a", [4], settings(tmp_path / "da"), tmp_path / "a.jsonl", log=lambda _: None)
    manifest = json.loads((tmp_path / "da" / "step4_memorization.parts" / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["weights"].startswith("ckpt:")
    # only A's parts (as a details folder left after the merged file and the record were removed)
    shutil.copytree(tmp_path / "da" / "step4_memorization.parts", tmp_path / "db" / "step4_memorization.parts")
    with pytest.raises(M.MemorizationError, match=r"holds memorization chunks of other weights \(weights: ckpt:"):
        evaluate_checkpoints(tmp_path / "b", [4], settings(tmp_path / "db"), tmp_path / "b.jsonl", log=lambda _: None)
    assert not (tmp_path / "db" / "step4_memorization.npy").exists()
    # a folder holding only the manifest of an earlier start says so
    for chunk in (tmp_path / "db" / "step4_memorization.parts").glob("chunk-*"):
        chunk.unlink()
    with pytest.raises(M.MemorizationError, match=r"step4_memorization.parts was started with other weights"):
        evaluate_checkpoints(tmp_path / "b", [4], settings(tmp_path / "db"), tmp_path / "b.jsonl", log=lambda _: None)
    # the whole details folder of A: its record names A's checkpoints
    shutil.copytree(tmp_path / "da", tmp_path / "dc")
    with pytest.raises(ProvenanceError, match=r"dc holds results of other checkpoints \(.*/a; these are .*/b\)"):
        evaluate_checkpoints(tmp_path / "b", [4], settings(tmp_path / "dc"), tmp_path / "c.jsonl", log=lambda _: None)
    # parts written before the manifest named the weights
    del manifest["weights"]
    manifest["version"] = 1
    (tmp_path / "db" / "step4_memorization.parts" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(M.MemorizationError, match="older pythia-jax, whose manifest does not say which weights"):
        evaluate_checkpoints(tmp_path / "b", [4], settings(tmp_path / "db"), tmp_path / "b.jsonl", log=lambda _: None)
    # B on its own details: its own scores (a random model memorizes nothing)
    evaluate_checkpoints(tmp_path / "b", [4], settings(tmp_path / "dd"), tmp_path / "d.jsonl", log=lambda _: None)
    got = {r["metric"]: r["value"] for r in map(json.loads, (tmp_path / "d.jsonl").read_text().splitlines())}
    assert got["num_memorized"] == 0


def test_sweep_names_the_generators_weights(setup, tmp_path):
    """Called directly without ``weights``, the sweep names the generator's own parameters, so a
    generator of other parameters does not reuse the chunks."""
    from flax import nnx

    from pythia_jax.data.run_data import RunData
    from pythia_jax.eval import memorization as M
    from pythia_jax.eval.generate import Generator
    from pythia_jax.model import GPTNeoX

    model, _, prefix = setup
    run = RunData.from_flags(data=prefix, order="preshuffled", seq_len=SEQ_LEN, global_batch=2)
    res = M.sweep_memorization(Generator(model, batch_size=8), run, 4, tmp_path, chunk_rows=4)
    assert res.per_row["memorized"].sum() == 4
    with pytest.raises(M.MemorizationError, match=r"chunks of other weights \(weights: params:"):
        M.sweep_memorization(Generator(GPTNeoX(CFG, rngs=nnx.Rngs(1)), batch_size=8), run, 4, tmp_path, chunk_rows=4)
