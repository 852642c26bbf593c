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


def test_long_prompt_truncated_from_left(model, generator):
    before = generator.truncated
    long = list(np.random.default_rng(0).integers(2, 256, 120))
    out = generator.generate([long], 8, stop_token=None)[0]
    assert generator.truncated == before + 1
    assert out == generate_no_cache(model, long[-(CFG.max_position_embeddings - 8):], 8, stop_token=None)


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


def test_bad_settings(generator):
    with pytest.raises(PythiaJaxError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(PythiaJaxError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(PythiaJaxError, match="no room"):
        generator.generate([[1, 2]], CFG.max_position_embeddings)
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
