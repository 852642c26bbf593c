"""pythia-jax: Pythia (GPT-NeoX) in JAX/Flax with the exact Pythia data order.

Public API (kept stable)::

    cfg = pythia_jax.ModelConfig.preset("pythia-160m")
    model = pythia_jax.init(cfg, seed=0)          # Pythia initialisation
    model = pythia_jax.load(path)                 # HF directory, project checkpoint, NeoX checkpoint
    logits = model(tokens)                        # int32 [batch, seq] -> float32 [batch, seq, vocab]
    pythia_jax.save_hf(model, out_dir, dtype="float16")
"""

from pythia_jax.config import ModelConfig, preset_names

__version__ = "0.1.0"


def init(config, seed: int = 0, **overrides):
    """A model with Pythia initialisation; ``config`` is a ModelConfig or a preset name."""
    from pythia_jax import api
    return api.init(config, seed=seed, **overrides)


def load(path, **kwargs):
    """Load a model from an HF directory, a checkpoint directory of this project or a NeoX checkpoint."""
    from pythia_jax import api
    return api.load(path, **kwargs)


def save_hf(model, out_dir, dtype: str = "float16", **kwargs):
    """Write ``model`` as a Hugging Face GPTNeoXForCausalLM directory."""
    from pythia_jax import api
    return api.save_hf(model, out_dir, dtype=dtype, **kwargs)


__all__ = ["ModelConfig", "preset_names", "init", "load", "save_hf", "__version__"]
