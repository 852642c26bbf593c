"""Read a GPT-NeoX (DeepSpeed) checkpoint's module weights into this project's params tree.

Both DeepSpeed forms are accepted: the pipeline form (one flat tensor dict per layer index and
tensor-parallel rank) and the sequential form (``mp_rank_XX_model_states.pt`` whose ``module``
dict holds ``sequential.{idx}.<key>`` tensors). Layer roles are recognised from the tensors
themselves (not only from the index arithmetic), MLP keys in both conventions
(``mlp.dense_h_to_4h`` / ``mlp.linear1`` …).

Tensor-parallel ranks are merged like GPT-NeoX's ``tools/ckpts/convert_neox_to_hf.py``:
concatenate on dim 0 (embedding, QKV, h→4h, head) or dim 1 (attention.dense / 4h→h weights),
average LayerNorms, and SUM the row-parallel biases when the model uses the parallel (GPT-J)
residual — each rank adds its own copy before the all-reduce there (``ParallelTransformerLayer``
in GPT-NeoX's ``megatron/model/transformer.py``). With a sequential residual the bias is added
once after the all-reduce, so rank 0's copy is taken (the NeoX converter sums there too, which
is wrong). The arithmetic runs in the checkpoint's dtype with the converter's operations, so the
result is bit-identical to what that converter would produce.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping, Sequence

from pythia_jax.config import ModelConfig
from pythia_jax.convert.hf import ParamAssembler
from pythia_jax.convert.neox.keys import (
    CAT0,
    CAT1,
    EMBED_KEYS,
    FINAL_NORM_KEYS,
    HEAD_KEYS,
    IGNORED_LAYER_KEYS,
    KEY_CONVENTIONS,
    NORM,
    REPLICATED,
    ROW_BIAS,
    SEQ_KEY,
)
from pythia_jax.convert.neox.layout import NeoxCheckpoint, locate_neox_checkpoint
from pythia_jax.convert.neox.torch_io import require_torch, torch_load
from pythia_jax.convert.neox.yml import as_bool, as_int, config_from_yml, yml_get
from pythia_jax.convert.progress import TensorProgress
from pythia_jax.errors import CheckpointError
from pythia_jax.host_memory import to_numpy


class LayerSource:
    """Per layer index, the tensor dicts of every TP rank (loaded lazily, memory-mapped)."""

    def __init__(self, ckpt: NeoxCheckpoint):
        self.ckpt = ckpt
        self._seq: list[dict[int, dict[str, Any]]] | None = None
        if ckpt.layout == "sequential":
            self._seq = []
            for t in range(ckpt.tp):
                file = ckpt.mp_files[t]
                state = torch_load(file)
                module = state.get("module") if isinstance(state, Mapping) else None
                if not isinstance(module, Mapping) or not module:
                    raise CheckpointError(f"{file} has no 'module' state dict (a pipeline checkpoint "
                                          "whose layer_XX files are missing?)")
                per_idx: dict[int, dict[str, Any]] = {}
                for key, value in module.items():
                    m = SEQ_KEY.match(key)
                    if not m:
                        raise CheckpointError(f"{file}: unexpected module key {key!r} "
                                              "(expected sequential.<idx>.<name>)")
                    per_idx.setdefault(int(m.group(1)), {})[m.group(2)] = value
                self._seq.append(per_idx)
            idx_sets = {tuple(sorted(s)) for s in self._seq}
            if len(idx_sets) > 1:
                raise CheckpointError(f"{ckpt.directory}: mp_rank files hold different layers")

    def indices(self) -> list[int]:
        if self._seq is not None:
            return sorted(self._seq[0])
        return sorted(self.ckpt.pipe_files)

    def where(self, idx: int) -> str:
        if self._seq is not None:
            return f"{self.ckpt.mp_files[0]} (sequential.{idx})"
        return self.ckpt.pipe_files[idx][0]

    def load(self, idx: int) -> list[Mapping[str, Any]]:
        if self._seq is not None:
            return [s.get(idx, {}) for s in self._seq]
        ranks = []
        for t in range(self.ckpt.tp):
            file = self.ckpt.pipe_files[idx][t]
            state = torch_load(file, tensors_only=True)
            if not isinstance(state, Mapping):
                raise CheckpointError(f"{file} does not hold a tensor dict")
            ranks.append(state)
        key_sets = {tuple(sorted(r)) for r in ranks}
        if len(key_sets) > 1:
            raise CheckpointError(f"{self.where(idx)}: tensor-parallel ranks hold different tensors")
        return ranks


@dataclasses.dataclass
class LayerRoles:
    """Which layer index holds the embedding, each transformer layer, the final norm and the head."""

    embed: int
    layers: list[int]       # layer indices in order (layer i = layers[i])
    final_norm: int
    head: int
    convention: str

    def table(self, idx: int) -> tuple[dict[str, tuple[str, str]], str]:
        """(NeoX key -> (HF key, rule), description) for one layer index."""
        if idx == self.embed:
            return EMBED_KEYS, "embedding"
        if idx == self.final_norm:
            return FINAL_NORM_KEYS, "final norm"
        if idx == self.head:
            return HEAD_KEYS, "output head"
        i = self.layers.index(idx)
        return ({k: (f"gpt_neox.layers.{i}.{hf}", rule) for k, (hf, rule) in
                 KEY_CONVENTIONS[self.convention].items()}, f"transformer layer {i}")


def detect_roles(source: LayerSource, num_layers: int) -> LayerRoles:
    """Roles of the checkpoint's layer indices, told from their tensors; ``CheckpointError`` for
    a missing part, a layer count other than ``num_layers`` or mixed key conventions."""
    embed = final_norm = head = None
    layers: list[int] = []
    convention = None
    for idx in source.indices():
        keys = set(source.load(idx)[0]) if source.ckpt.layout == "sequential" else None
        if keys is None:
            keys = set(torch_load(source.ckpt.pipe_files[idx][0], tensors_only=True))
        if "word_embeddings.weight" in keys:
            if "position_embeddings.weight" in keys:
                raise CheckpointError(f"{source.where(idx)}: learned position embeddings are not "
                                      "a GPT-NeoX/HF rotary model")
            embed = idx
        elif "attention.query_key_value.weight" in keys:
            layers.append(idx)
            found = [name for name, table in KEY_CONVENTIONS.items()
                     if any(k.startswith("mlp.") and k in keys for k in table)]
            if len(found) != 1:
                raise CheckpointError(f"{source.where(idx)}: cannot tell the MLP key convention "
                                      f"from its tensors {sorted(keys)}")
            if convention not in (None, found[0]):
                raise CheckpointError(f"{source.ckpt.directory}: layers mix key conventions")
            convention = found[0]
        elif "final_linear.weight" in keys:
            head = idx
        elif "norm.weight" in keys:
            final_norm = idx
        elif keys - {"attention.rotary_emb.inv_freq"}:
            raise CheckpointError(f"{source.where(idx)}: unrecognised tensors {sorted(keys)[:6]}")
    where = source.ckpt.directory
    if embed is None:
        raise CheckpointError(f"{where}: no word_embeddings.weight (layer 0) found")
    if head is None:
        untied = as_bool(yml_get(source.ckpt.yml, "no-weight-tying", False))
        last = max(source.indices(), default=None)
        raise CheckpointError(
            f"{where}: no final_linear.weight (the output head) found"
            + (f": the yml says no-weight-tying, so its layer file (after layer_{last:02d}, the final norm's) "
               "is missing or unreadable" if untied and last is not None else
               " (weight-tied models are not supported: GPT-NeoX/Pythia use an untied head)"))
    if final_norm is None:
        raise CheckpointError(f"{where}: no final norm (norm.weight) found")
    if len(layers) != num_layers:
        raise CheckpointError(f"{where}: found {len(layers)} transformer layers, the config says "
                              f"num-layers {num_layers}")
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise CheckpointError(f"{where}: transformer layer indices {layers} are not contiguous")
    return LayerRoles(embed, layers, final_norm, head, convention or "v1")


def merge_tp(tensors: Sequence[Any], rule: str, parallel_residual: bool = True) -> Any:
    """Merge one tensor's TP shards (torch tensors) the way GPT-NeoX's HF converter does."""
    torch = require_torch()
    if len(tensors) == 1:
        return tensors[0]
    if rule == CAT0:
        return torch.cat(list(tensors), dim=0)
    if rule == CAT1:
        return torch.cat(list(tensors), dim=1)
    if rule == NORM:
        return sum(tensors) / len(tensors)
    if rule == ROW_BIAS:
        return sum(tensors) if parallel_residual else tensors[0]
    if rule == REPLICATED:
        return tensors[0]
    raise ValueError(f"unknown merge rule {rule}")


def merge_layer(ranks: Sequence[Mapping[str, Any]], table: Mapping[str, tuple[str, str]],
                 where: str, parallel_residual: bool, rule_override: Mapping[str, str] | None = None
                 ) -> Iterable[tuple[str, Any]]:
    """Yield ``(HF key, merged torch tensor)`` of one layer index from its TP ranks' tensor dicts.

    ``table`` maps NeoX key -> (HF key, merge rule); ``rule_override`` swaps rules (the Adam
    moments of row-parallel biases are taken from rank 0). ``CheckpointError`` names ``where``
    for an unexpected or missing tensor or shards that do not fit together.
    """
    keys = set(ranks[0])
    unknown = keys - set(table) - set(IGNORED_LAYER_KEYS)
    if unknown:
        raise CheckpointError(f"{where}: unexpected tensors {sorted(unknown)}")
    for neox_key, (hf_key, rule) in table.items():
        if neox_key not in keys:
            raise CheckpointError(f"{where}: missing tensor {neox_key}")
        rule = (rule_override or {}).get(rule, rule)
        try:
            merged = merge_tp([r[neox_key] for r in ranks], rule, parallel_residual)
        except RuntimeError as e:
            raise CheckpointError(f"{where}: cannot merge tensor-parallel shards of {neox_key}: {e}") from None
        yield hf_key, merged


def _infer_shapes(source: LayerSource, roles: LayerRoles) -> tuple[int, int]:
    """(vocab size, MLP width) of the merged model, from the TP shards' shapes."""
    embed = source.load(roles.embed)
    vocab = sum(int(r["word_embeddings.weight"].shape[0]) for r in embed)
    layer = source.load(roles.layers[0])
    key = "mlp.dense_h_to_4h.weight" if roles.convention == "v1" else "mlp.linear1.weight"
    ff = sum(int(r[key].shape[0]) for r in layer)
    return vocab, ff


def read_neox_checkpoint(path: str | os.PathLike, *, step: int | None = None,
                         config_files: Sequence[str] | None = None, hidden_act: str | None = None,
                         progress: bool = False) -> tuple[ModelConfig, dict[str, Any], NeoxCheckpoint]:
    """Read a GPT-NeoX checkpoint -> (ModelConfig, params of float32 ``np.ndarray``, located info).

    The params are the module weights (the fp16/bf16 copy DeepSpeed saves); see
    ``read_neox_optimizer_state`` for the fp32 master weights of ZeRO checkpoints.
    ``hidden_act`` overrides the GELU flavour read from the yml (``bias-gelu-fusion`` -> tanh).
    """
    ckpt = locate_neox_checkpoint(path, step, config_files)
    source = LayerSource(ckpt)
    num_layers = as_int(yml_get(ckpt.yml, "num-layers", 0) or 0, "num-layers")
    roles = detect_roles(source, num_layers)
    vocab, ff = _infer_shapes(source, roles)
    config = config_from_yml(ckpt.yml, vocab_size=vocab, intermediate_size=ff, name=ckpt.name,
                             hidden_act=hidden_act)
    assembler = ParamAssembler(config, source=ckpt.directory)
    order = [roles.embed] + roles.layers + [roles.final_norm, roles.head]
    with TensorProgress(progress, len(order), f"reading {os.path.basename(ckpt.directory)}") as bar:
        for idx in order:
            table, what = roles.table(idx)
            where = f"{source.where(idx)} ({what})"
            assembler.source = where
            for hf_key, tensor in merge_layer(source.load(idx), table, where, config.use_parallel_residual):
                assembler.add(hf_key, to_numpy(tensor))
            bar()
    assembler.source = ckpt.directory
    return config, assembler.finish(), ckpt
