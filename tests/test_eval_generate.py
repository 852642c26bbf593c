"""KV-cache generation equals recomputing the whole prefix, token for token; sampling filters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pythia_jax.config import ModelConfig
from pythia_jax.errors import PythiaJaxError
from pythia_jax.eval.generate import Generator, SamplingConfig, generate_no_cache, sample_logits

CFG = ModelConfig(name="tiny", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                  max_position_embeddings=96)


@pytest.fixture(scope="module")
def model():
    from flax import nnx

    from pythia_jax.model import GPTNeoX
    return GPTNeoX(CFG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def generator(model):
    return Generator(model, batch_size=4)


PROMPTS = [[5, 9, 200], [17] * 11, list(range(30, 63)), [1], [7, 7, 8, 100, 3, 250, 99, 4, 2]]


def test_kv_cache_equals_recompute(model, generator):
    """Left-padded batched decoding with the cache == per-prompt greedy recompute without cache."""
    outs = generator.generate(PROMPTS, 24, stop_token=None)
    for prompt, out in zip(PROMPTS, outs):
        assert out == generate_no_cache(model, prompt, 24, stop_token=None)
        assert len(out) == 24


def test_stop_token(model, generator):
    """With a stop token, output is cut before its first occurrence, like the recompute reference."""
    free = generator.generate(PROMPTS, 24, stop_token=None)
    # pick a token the model does produce for some prompt, and stop on it
    stop = free[0][5]
    outs = generator.generate(PROMPTS, 24, stop_token=stop)
    for prompt, f, out in zip(PROMPTS, free, outs):
        assert out == generate_no_cache(model, prompt, 24, stop_token=stop)
        assert out == (f[:f.index(stop)] if stop in f else f)
    assert len(outs[0]) <= 5


def test_long_prompt_cut_only_when_asked(model, generator, caplog):
    """``max_prompt_len`` (lm-eval's left truncation) keeps the last tokens, counts and logs the cut;
    without it the whole prompt is used (the cache grows past max_position_embeddings)."""
    before = generator.truncated
    long = [int(t) for t in np.random.default_rng(0).integers(2, 256, 120)]
    room = CFG.max_position_embeddings - 8
    with caplog.at_level("WARNING", logger="pythia_jax.eval.generate"):
        out = generator.generate([long, [3, 4]], 8, stop_token=None, max_prompt_len=room)[0]
    assert generator.truncated == before + 1
    assert "1 of 2 prompts were cut from the left to their last 88 tokens" in caplog.text
    assert out == generate_no_cache(model, long[-room:], 8, stop_token=None)
    caplog.clear()
    with caplog.at_level("WARNING", logger="pythia_jax.eval.generate"):
        whole = generator.generate([long], 8, stop_token=None)[0]
    assert generator.truncated == before + 1  # nothing cut
    assert "1 of 1 prompts + 8 new tokens run past the model's 96 trained positions" in caplog.text
    fwd = jax.jit(lambda t: jnp.argmax(model(t)[0, -1]))
    ref = list(long)
    for _ in range(8):  # greedy without a cache over the whole prompt
        ref.append(int(fwd(np.asarray([ref], np.int32))))
    assert whole == ref[len(long):]


def test_long_prompt_equals_hf_generate(tmp_path):
    """A 20-token prompt for a model of max_position_embeddings=16 (HF keeps the whole prompt;
    pythia-jax used to cut it to its last 16 - 6 tokens)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flax import nnx

    from pythia_jax.convert.hf import write_hf_dir
    from pythia_jax.model import GPTNeoX, params_to_dict

    cfg = ModelConfig(name="tiny16", vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4,
                      max_position_embeddings=16)
    model = GPTNeoX(cfg, rngs=nnx.Rngs(7))
    hf_dir = write_hf_dir(cfg, params_to_dict(model), tmp_path / "hf", dtype="float32")
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    prompts = [[int(t) for t in np.random.default_rng(s).integers(1, 1000, n)] for s, n in ((1, 20), (2, 5))]
    ours = Generator(model, batch_size=2).generate(prompts, 6, stop_token=None)
    for prompt, new in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert new == ref[0, len(prompt):].tolist()


def test_token_ids_outside_vocab_refused(generator):
    from pythia_jax.errors import TokenIdError

    msg = (r"token ids of the 2 prompt\(s\) lie outside the model's vocabulary: ids from 3 to 256, "
           r"but vocab_size is 256 \(valid ids 0..255\)")
    with pytest.raises(TokenIdError, match=msg):
        generator.generate([[3, 4], [5, 256]], 4)
    with pytest.raises(TokenIdError, match="ids from -1 to 7"):
        generator.generate([[-1, 7]], 4)


def test_sampling(generator):
    greedy = generator.generate(PROMPTS, 10, stop_token=None)
    assert generator.generate(PROMPTS, 10, sampling=SamplingConfig(1.0, top_k=1), stop_token=None) == greedy
    s1 = generator.generate(PROMPTS, 10, sampling=SamplingConfig(1.5), seed=1, stop_token=None)
    s2 = generator.generate(PROMPTS, 10, sampling=SamplingConfig(1.5), seed=1, stop_token=None)
    s3 = generator.generate(PROMPTS, 10, sampling=SamplingConfig(1.5), seed=2, stop_token=None)
    assert s1 == s2 and s1 != s3


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    top2 = np.asarray(sample_logits(logits, keys, SamplingConfig(1.0, top_k=2)))
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.asarray(sample_logits(logits, keys, SamplingConfig(1.0, top_p=0.7)))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: two tokens kept
    assert abs(np.mean(nucleus == 0) - 0.5 / 0.8) < 0.03
    full = np.asarray(sample_logits(logits, keys, SamplingConfig(1.0)))
    assert set(full.tolist()) == {0, 1, 2, 3}
    # a tiny temperature is greedy, not NaN (logits / 1e-38 overflowed to inf, then inf - inf)
    for t in (1e-38, 1e-45):
        assert set(np.asarray(sample_logits(logits * 50, keys, SamplingConfig(t))).tolist()) == {0}


def test_bad_settings(generator):
    with pytest.raises(PythiaJaxError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(PythiaJaxError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(PythiaJaxError, match="max_prompt_len must be >= 1"):
        generator.generate([[1, 2]], 4, max_prompt_len=0)
    with pytest.raises(PythiaJaxError, match="empty"):
        generator.generate([[]], 4)


@pytest.mark.slow
def test_sharded_over_mesh_matches_single_device(model, generator):
    """Scoring and generation with the batch split over 4 simulated devices give the same results."""
    from pythia_jax.eval.scoring import Scorer

    rng = np.random.default_rng(0)
    reqs = [(rng.integers(1, 256, int(rng.integers(1, 40))).tolist(), rng.integers(1, 256, 3).tolist())
            for _ in range(10)]
    ref_ll = Scorer(model, batch_size=4).loglikelihood(reqs).loglik.tolist()
    ref_gen = generator.generate(PROMPTS, 12, stop_token=None)
    script = textwrap.dedent(f"""
        import json, sys
        import jax
        from flax import nnx
        from pythia_jax.config import ModelConfig
        from pythia_jax.model import GPTNeoX
        from pythia_jax.eval.generate import Generator
        from pythia_jax.eval.scoring import Scorer
        assert jax.device_count() == 4
        cfg = ModelConfig(**{CFG.to_dict()!r})
        model = GPTNeoX(cfg, rngs=nnx.Rngs(3))
        sc = Scorer(model, batch_size=4)
        assert sc.placed.num_shards == 4
        ll = sc.loglikelihood({reqs!r}).loglik.tolist()
        gen = Generator(model, batch_size=4).generate({PROMPTS!r}, 12, stop_token=None)
        print(json.dumps({{"ll": ll, "gen": gen}}))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["ll"], ref_ll, atol=1e-4)
    assert got["gen"] == ref_gen
