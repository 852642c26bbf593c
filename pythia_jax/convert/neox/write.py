"""Write this project's params as a tensor-parallel-1 GPT-NeoX pipeline checkpoint.

The layout is what GPT-NeoX's ``megatron/checkpointing.py`` saves for a TP 1 / PP 1 run (layer
files named by DeepSpeed's ``PipelineModule``, indices of ``GPT2ModelPipe``) plus a yml that
GPT-NeoX's ``tools/ckpts/convert_neox_to_hf.py`` and its training scripts read.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

import numpy as np

from pythia_jax.config import ModelConfig
from pythia_jax.convert.hf import canonical_dtype, iter_hf_tensors
from pythia_jax.convert.hf_keys import check_params
from pythia_jax.convert.neox.keys import KEY_CONVENTIONS
from pythia_jax.convert.neox.torch_io import require_torch
from pythia_jax.convert.neox.yml import neox_yml, yml_text
from pythia_jax.convert.progress import TensorProgress
from pythia_jax.data.tokenizer import TOKENIZER_FILE


def iter_neox_layers(config: ModelConfig, params: Mapping[str, Any], dtype: Any
                     ) -> Iterable[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(pipeline layer index, {NeoX key: np.ndarray})`` one layer at a time (TP 1, v1 names).

    Built from ``iter_hf_tensors`` (HF order groups tensors by layer), so only one layer's
    tensors exist at a time besides ``params``.
    """
    L = config.num_layers
    hf_to_neox = {hf: neox for neox, (hf, _) in KEY_CONVENTIONS["v1"].items()}
    rd = config.rotary_ndims
    inv_freq = 1.0 / (config.rotary_emb_base ** (np.arange(0, rd, 2, dtype=np.float32) / rd))
    current, group = None, {}
    for key, value in iter_hf_tensors(config, params, dtype):
        if key == "gpt_neox.embed_in.weight":
            idx, name = 0, "word_embeddings.weight"
        elif key == "embed_out.weight":
            idx, name = L + 4, "final_linear.weight"
        elif key.startswith("gpt_neox.final_layer_norm."):
            idx, name = L + 3, "norm." + key.rsplit(".", 1)[1]
        else:
            _, _, i, suffix = key.split(".", 3)
            idx, name = int(i) + 2, hf_to_neox[suffix]
        if idx != current and group:
            yield current, group
            group = {}
        current = idx
        if not group and 2 <= idx < L + 2:
            group["attention.rotary_emb.inv_freq"] = inv_freq.astype(dtype)
        group[name] = value
    if group:
        yield current, group



def write_neox_checkpoint(config: ModelConfig, params: Mapping[str, Any], out_dir: str | os.PathLike, *,
                          step: int = 0, dtype: Any = "float32", overwrite: bool = False,
                          progress: bool = False, yml_extra: Mapping[str, Any] | None = None) -> str:
    """Write a TP-1 GPT-NeoX pipeline checkpoint, atomically; return the step folder.

    Layout: ``out_dir/latest`` ("global_stepN"), ``out_dir/20B_tokenizer.json`` and
    ``out_dir/global_stepN/`` with ``layer_XX-model_00-model_states.pt`` (XX = 0, 2…L+1, L+3, L+4),
    a minimal ``mp_rank_00_model_states.pt`` (iteration, no optimizer) and ``configs/<name>.yml``.
    """
    torch = require_torch()
    from pythia_jax.io_utils import atomic_output_dir, check_output_dir

    name = canonical_dtype(dtype)
    np_dtype = np.float32 if name == "bfloat16" else np.dtype(name)  # bf16 via torch below
    check_output_dir(out_dir, overwrite, kind="neox")
    check_params(config, params)
    final_root = os.path.abspath(os.fspath(out_dir))
    tag = f"global_step{int(step)}"
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    with atomic_output_dir(out_dir, overwrite, kind="neox") as tmp:
        step_dir = tmp / tag
        (step_dir / "configs").mkdir(parents=True)
        with TensorProgress(progress, config.num_layers + 3, f"writing {tag}") as bar:
            for idx, layer in iter_neox_layers(config, params, np_dtype):
                tensors = {k: torch.from_numpy(v).to(torch_dtype) for k, v in layer.items()}
                del layer
                torch.save(tensors, step_dir / f"layer_{idx:02d}-model_00-model_states.pt")
                del tensors
                bar()
        torch.save({"module": None, "buffer_names": [], "optimizer": None, "param_shapes": None,
                    "lr_scheduler": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
                    "global_steps": int(step), "global_samples": None, "dp_world_size": 1,
                    "mp_world_size": 1, "iteration": int(step)},
                   step_dir / "mp_rank_00_model_states.pt")
        import shutil
        shutil.copyfile(TOKENIZER_FILE, tmp / "20B_tokenizer.json")
        yml = neox_yml(config, vocab_file=os.path.join(final_root, "20B_tokenizer.json"),
                       **dict(yml_extra or {}))
        yml_name = re.sub(r"[^A-Za-z0-9._-]", "_", config.name or "model") + ".yml"
        with open(step_dir / "configs" / yml_name, "w", encoding="utf-8") as f:
            f.write(yml_text(yml))
        (tmp / "latest").write_text(tag)
    return os.path.join(final_root, tag)
