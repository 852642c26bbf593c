"""Original GPT-NeoX (DeepSpeed) checkpoints <-> this project's params.

Reading (``read_neox_checkpoint``) accepts a ``global_stepN/`` folder (or its parent, with a
``latest`` file or several ``global_step*`` folders) in either DeepSpeed form:

* pipeline: ``layer_{idx:02d}-model_{tp:02d}-model_states.pt``, one flat tensor dict per layer
  index and tensor-parallel rank (idx 0 embedding, 2…L+1 transformer layers, L+3 final norm,
  L+4 output head: the layer list of GPT-NeoX's ``GPT2ModelPipe``);
* sequential: ``mp_rank_{tp:02d}_model_states.pt`` whose ``module`` dict holds
  ``sequential.{idx}.<key>`` tensors.

Tensor-parallel ranks are merged like GPT-NeoX's ``tools/ckpts/convert_neox_to_hf.py`` (bit for
bit), except that row-parallel biases are summed only with the parallel residual. The model
config comes from the ``configs/*.yml`` saved with the checkpoint plus the tensor shapes
(vocabulary, MLP width). ZeRO stage 1/2 optimizer shards are read by
``read_neox_optimizer_state`` (the protocol of DeepSpeed's ``zero_to_fp32.py``). Writing
(``write_neox_checkpoint``) produces the pipeline form at TP 1 plus a yml that GPT-NeoX's HF
converter reads.

Modules, one job each:

- ``keys``: file-name patterns, NeoX -> HF key tables and their tensor-parallel merge rules.
- ``torch_io``: ``torch.load`` that tolerates pickled DeepSpeed / Megatron objects.
- ``yml``: read GPT-NeoX yml configs (``ModelConfig``, optimizer settings) and write them.
- ``layout``: locate the step folder, its files and tensor-parallel size (``locate_neox_checkpoint``).
- ``read``: layer roles, tensor-parallel merging, ``read_neox_checkpoint``.
- ``zero``: ZeRO optimizer shards -> fp32 master weights and Adam moments.
- ``write``: ``write_neox_checkpoint``.

Continuing training from the imported optimizer state is ``pythia_jax.train.continuation``
(``neox_train_state``, ``fresh_opt_state``): training, not conversion, so this package never
imports ``pythia_jax.train``.
"""

from __future__ import annotations

from pythia_jax.convert.neox.keys import (
                                          CAT0,
                                          CAT1,
                                          EMBED_KEYS,
                                          FINAL_NORM_KEYS,
                                          HEAD_KEYS,
                                          IGNORED_LAYER_KEYS,
                                          KEY_CONVENTIONS,
                                          MP_FILE,
                                          NORM,
                                          OPTIM_FILE,
                                          PIPE_FILE,
                                          REPLICATED,
                                          ROW_BIAS,
                                          SEQ_KEY,
                                          STEP_DIR,
)
from pythia_jax.convert.neox.layout import NeoxCheckpoint, is_neox_checkpoint, locate_neox_checkpoint
from pythia_jax.convert.neox.read import (
                                          LayerRoles,
                                          LayerSource,
                                          detect_roles,
                                          merge_layer,
                                          merge_tp,
                                          read_neox_checkpoint,
)
from pythia_jax.convert.neox.torch_io import plain_value, require_torch, torch_load
from pythia_jax.convert.neox.write import iter_neox_layers, write_neox_checkpoint
from pythia_jax.convert.neox.yml import config_from_yml, neox_yml, optimizer_settings, read_neox_yml, yml_get, yml_text
from pythia_jax.convert.neox.zero import NeoxOptimizerState, read_neox_optimizer_state

__all__ = [
    "CAT0", "CAT1", "EMBED_KEYS", "FINAL_NORM_KEYS", "HEAD_KEYS", "IGNORED_LAYER_KEYS", "KEY_CONVENTIONS",
    "MP_FILE", "NORM", "OPTIM_FILE", "PIPE_FILE", "REPLICATED", "ROW_BIAS", "SEQ_KEY", "STEP_DIR",
    "plain_value", "require_torch", "torch_load",
    "config_from_yml", "neox_yml", "optimizer_settings", "read_neox_yml", "yml_get", "yml_text",
    "NeoxCheckpoint", "is_neox_checkpoint", "locate_neox_checkpoint",
    "LayerRoles", "LayerSource", "detect_roles", "merge_layer", "merge_tp", "read_neox_checkpoint",
    "NeoxOptimizerState", "read_neox_optimizer_state",
    "iter_neox_layers", "write_neox_checkpoint",
]
