#!/usr/bin/env python
"""Compare the attention implementations of the model on one accelerator.

On a pythia-410m-shaped random model (Pythia initialisation) at batch 4 × seq 2048, for float32
and bfloat16 compute, runs the forward pass with attention = reference / xla / cudnn / auto and
prints the max-abs logit difference of each against the float32 'reference' path (and against the
same dtype's reference) plus the median forward time. cuDNN runs only on a GPU and only in
bf16 (the fused kernel has no float32 mode).

    python scripts/gpu_model_check.py            # on a GPU
    python scripts/gpu_model_check.py --small    # tiny shape, anywhere (cuDNN skipped off GPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pythia_jax.config import ModelConfig
from pythia_jax.layers import resolve_attention_impl
from pythia_jax.model import GPTNeoX, model_from_params, params_to_dict


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="pythia-14m shape, batch 2 × seq 256")
    p.add_argument("--model", default=None, help="preset name (default pythia-410m, or 14m with --small)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes per variant")
    p.add_argument("--highest", action="store_true",
                   help="float32 matmuls at 'highest' precision (GPUs otherwise may use TF32)")
    return p.parse_args()


def time_forward(fn, params, tokens, repeats: int) -> tuple[jax.Array, float, float]:
    """(logits, compile+first-run seconds, median seconds of ``repeats`` further runs)."""
    start = time.perf_counter()
    logits = jax.block_until_ready(fn(params, tokens))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(params, tokens))
        times.append(time.perf_counter() - start)
    return logits, first, statistics.median(times)


def main() -> int:
    args = parse_args()
    if args.highest:
        jax.config.update("jax_default_matmul_precision", "highest")
    name = args.model or ("pythia-14m" if args.small else "pythia-410m")
    batch = args.batch or (2 if args.small else 4)
    seq = args.seq or (256 if args.small else 2048)
    base = ModelConfig.preset(name)
    backend = jax.default_backend()
    print(f"device: {jax.devices()[0].device_kind} ({backend}); model {name} "
          f"(L={base.num_layers} H={base.hidden_size} heads={base.num_heads}); batch {batch} × seq {seq}; "
          f"matmul precision {jax.config.jax_default_matmul_precision or 'default'}")

    params = jax.jit(lambda: params_to_dict(GPTNeoX(base, rngs=nnx.Rngs(0))))()
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, base.vocab_size, (batch, seq)), jnp.int32)
    tokens_per_s = lambda t: batch * seq / t

    variants = []
    for dtype in ("float32", "bfloat16"):
        for impl in ("reference", "xla", "cudnn", "auto"):
            if impl == "cudnn" and (backend != "gpu" or dtype == "float32"):
                continue
            variants.append((dtype, impl))

    fp32_ref = None
    rows = []
    for dtype, impl in variants:
        config = base.replace(dtype=dtype, attention=impl)
        q_probe = jnp.zeros((batch, seq, config.num_heads, config.head_dim), config.dtype)
        chosen = resolve_attention_impl(impl, q_probe, masked=False)
        fn = jax.jit(lambda p, t, c=config: model_from_params(c, p)(t))
        logits, first, median = time_forward(fn, params, tokens, args.repeats)
        if dtype == "float32" and impl == "reference":
            fp32_ref = logits
        if impl == "reference":
            dtype_ref = logits
        vs_fp32 = float(jnp.abs(logits - fp32_ref).max())
        vs_dtype = float(jnp.abs(logits - dtype_ref).max())
        rows.append((dtype, impl, chosen, vs_fp32, vs_dtype, first, median, tokens_per_s(median)))
        del logits

    header = ("dtype", "attention", "runs as", "maxabs vs fp32 ref", "maxabs vs same-dtype ref",
              "compile+1st s", "fwd s", "tokens/s")
    print(" | ".join(header))
    for r in rows:
        print(f"{r[0]} | {r[1]} | {r[2]} | {r[3]:.3e} | {r[4]:.3e} | {r[5]:.2f} | {r[6]:.4f} | {r[7]:,.0f}")
    xla_bf16 = next((r for r in rows if r[:2] == ("bfloat16", "xla")), None)
    for r in rows:
        if r[0] == "bfloat16" and r[1] != "xla" and xla_bf16:
            print(f"bf16 {r[1]} forward time / bf16 xla forward time: {r[6] / xla_bf16[6]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
