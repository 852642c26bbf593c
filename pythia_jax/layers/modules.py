"""The parameterised building blocks of GPT-NeoX: ``Dense``, ``Embed``, ``LayerNorm``, and GELU.

Parameters carry their logical axis names as the NNX variable metadata ``out_sharding`` (a tuple
of names such as ``('embed', 'heads')``); eager sharding is off, so modules can be built without
a mesh. Initialisers are plain normals with the standard deviations of ``ModelConfig``
(``input_init_std``, ``output_init_std``), as GPT-NeoX ``megatron/model/init_functions.py``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def _param(init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...], dtype, names: tuple[str, ...]) -> nnx.Param:
    """A parameter initialised by ``init`` and tagged with its logical axis names."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def normal(std: float) -> Initializer:
    """Plain (untruncated) normal initializer with standard deviation ``std``."""
    return jax.nn.initializers.normal(stddev=std)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` on 2-D activations.

    kernel [in, out] (the transpose of torch's weight), bias [out]; input [M, in] in any dtype,
    computed in ``dtype``; output [M, out] in ``dtype`` (or ``out_dtype``).
    """

    def __init__(self, in_features: int, out_features: int, *, kernel_std: float,
                 names: tuple[str, str], use_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = _param(normal(kernel_std), rngs, (in_features, out_features), param_dtype, names)
        self.bias = (_param(jax.nn.initializers.zeros, rngs, (out_features,), param_dtype, names[1:])
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        out_dtype = out_dtype or self.dtype
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                    preferred_element_type=out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(out_dtype)
        return y.astype(out_dtype)


class Embed(nnx.Module):
    """Token embedding table ``embedding`` [V, H]; tokens [M] int -> [M, H] in ``dtype``."""

    def __init__(self, num_embeddings: int, features: int, *, std: float, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = _param(normal(std), rngs, (num_embeddings, features), param_dtype,
                                ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch-style LayerNorm: biased variance, ``eps`` inside the sqrt, statistics in float32.

    scale [H] (init 1), bias [H] (init 0); x [..., H] -> same shape in ``dtype``.
    """

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.scale = _param(jax.nn.initializers.ones, rngs, (features,), param_dtype, ("norm",))
        self.bias = _param(jax.nn.initializers.zeros, rngs, (features,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


_SQRT_HALF = 0.7071067811865476


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
    """GELU of x (any shape) in x's dtype: the exact erf form (HF "gelu") or the tanh
    approximation ("gelu_new", GPT-NeoX ``bias_gelu_impl`` training).

    The exact form is ``x · Φ(x)``, ``Φ(x) = ½(1 + erf(x/√2))``, evaluated in float32 and rounded
    to x's dtype: the formula of PyTorch's ``torch.nn.functional.gelu`` kernel (float32 "opmath"
    for half types), which HF ``GELUActivation`` calls. ``jax.nn.gelu(approximate=False)`` uses
    ``erfc`` and the input dtype instead: in bfloat16 it equalled torch on 56% of inputs, this form
    on 95% (the rest one ulp apart). Both agree to 1e-6 in float32; the train-step time is the
    same within noise.
    """
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    xf = x.astype(jnp.float32)
    # Φ(x) = ½(1 + erf(x/√2)); clipped at 0 because float32 erf may round below -1 in the far
    # negative tail (there GELU is below 1e-6 in magnitude in every implementation)
    cdf = jnp.maximum(0.5 * (1.0 + jax.lax.erf(xf * jnp.float32(_SQRT_HALF))), 0.0)
    return (xf * cdf).astype(x.dtype)
