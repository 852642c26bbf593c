"""Every key of a GPT-NeoX training yml is read, checked, ignored for a reason, or known as a
training/data/logging setting; a model the reader cannot run is refused by key and value before
any tensor is read."""

from __future__ import annotations

import logging

import pytest

from pythia_jax.config import ModelConfig
from pythia_jax.convert.neox_yml_keys import NEOX_MODEL_KEYS, NEOX_OTHER_KEYS, check_neox_yml
from pythia_jax.errors import ConfigError, PythiaJaxError

# Union of the keys of the released Pythia ymls (EleutherAI/pythia, models/*/pythia-*.yml).
PYTHIA_YML_KEYS = """
attention-config attention-dropout bias-gelu-fusion checkpoint-activations checkpoint-factor
checkpoint-num-layers data-impl deepspeed-slurm distributed-backend eval-interval eval-iters
extra-save-iters fp16 gas gpt-j-residual gradient-accumulation-steps gradient-clipping hidden-dropout
hidden-size init-method launcher log-interval lr-decay-iters lr-decay-style max-position-embeddings
min-lr model-parallel-size no-weight-tying norm num-attention-heads num-layers num-workers optimizer
output-layer-init-method output-layer-parallelism partition-activations pipe-parallel-size pos-emb
rotary-pct scaled-upper-triang-masked-softmax-fusion seq-length steps-per-print synchronize-each-layer
test-data-paths tokenizer-type train-data-paths train-iters train-micro-batch-size-per-gpu
valid-data-paths vocab-file wall-clock-breakdown warmup weight-decay zero-optimization
""".split()

PYTHIA_160M_MODEL = {
    "pipe-parallel-size": 1, "model-parallel-size": 1, "num-layers": 12, "hidden-size": 768,
    "num-attention-heads": 12, "seq-length": 2048, "max-position-embeddings": 2048, "pos-emb": "rotary",
    "rotary-pct": 0.25, "no-weight-tying": True, "gpt-j-residual": True, "output-layer-parallelism": "column",
    "attention-config": [[["flash"], 12]], "scaled-upper-triang-masked-softmax-fusion": True,
    "bias-gelu-fusion": True, "init_method": "small_init", "output_layer_init_method": "wang_init",
    "norm": "layernorm", "hidden-dropout": 0, "attention-dropout": 0, "fp16": {"enabled": True},
}


def _known(key: str) -> bool:
    key = key.replace("-", "_")
    return key in NEOX_MODEL_KEYS or key in NEOX_OTHER_KEYS


def test_tables_cover_the_released_ymls_and_our_writer():
    from pythia_jax.convert.neox import neox_yml

    assert not set(NEOX_MODEL_KEYS) & NEOX_OTHER_KEYS
    assert {kind for kind, _ in NEOX_MODEL_KEYS.values()} == {"read", "checked", "ignored"}
    written = neox_yml(ModelConfig.preset("pythia-70m"), vocab_file="x.json")
    unknown = sorted(k for k in list(written) + PYTHIA_YML_KEYS if not _known(k))
    assert not unknown, f"add to convert/neox_yml_keys.py: {unknown}"
    check_neox_yml(written)


def test_released_model_keys_pass_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="pythia_jax.convert.neox_yml_keys"):
        check_neox_yml(PYTHIA_160M_MODEL)
        check_neox_yml({k.replace("-", "_"): v for k, v in PYTHIA_160M_MODEL.items()})  # 6.9b/12b spelling
    assert caplog.text == ""


REFUSED = [
    ({"pos-emb": "learned"}, "pos-emb='learned'"),
    ({"pos-emb": "alibi"}, "pos-emb='alibi'"),
    ({"pos-emb": None}, "pos-emb='learned'.*key is absent"),
    ({"no-weight-tying": False}, "no-weight-tying=False"),
    ({"no-weight-tying": None}, "no-weight-tying=None"),
    ({"norm": "rmsnorm"}, "norm='rmsnorm'"),
    ({"activation": "swiglu"}, "activation='swiglu'"),
    ({"gpt-j-tied": True}, "gpt-j-tied=True"),
    ({"attention-config": [[["global"], 6], [["local"], 6]]}, r"attention-config=.*\['local'\]"),
    ({"attention-config": ["global", "sparse_fixed"]}, r"\['sparse_fixed'\]"),
    ({"num-unique-layers": 3}, "num-unique-layers=3"),
    ({"num_kv_heads": 4}, "num-kv-heads=4"),
    ({"sliding-window-width": 256}, "sliding-window-width=256"),
    ({"use-qk-layernorm": True}, "use-qk-layernorm=True"),
    ({"use-bias-in-norms": False}, "use-bias-in-norms=False"),
    ({"use-bias-in-attn-linear": False}, "use-bias-in-attn-linear=False"),
    ({"use_bias_in_mlp": False}, "use-bias-in-mlp=False"),
    ({"soft-prompt-tuning": {"enabled": True, "n_tokens": 10}}, "soft-prompt-tuning="),
    ({"output-layer-parallelism": "row"}, "output-layer-parallelism='row'"),
    ({"use-mup": True}, "use-mup=True"),
    ({"moe-num-experts": 8}, "moe-num-experts=8"),
    ({"sparse-attention": {"mode": "fixed"}}, "sparse-attention="),
]


@pytest.mark.parametrize("change,pattern", REFUSED, ids=[p for _, p in REFUSED])
def test_unsupported_model_keys_are_refused_by_name(change, pattern):
    yml = {**PYTHIA_160M_MODEL, **change}
    if list(change.values())[0] is None:
        del yml[list(change)[0]]
    with pytest.raises(ConfigError, match=pattern) as info:
        check_neox_yml(yml)
    assert isinstance(info.value, PythiaJaxError)


@pytest.mark.parametrize("change", [{"num-unique-layers": 12}, {"num-kv-heads": 12}, {"moe-num-experts": 1},
                                    {"attention-config": [[["global"], 12]]}, {"apply-query-key-layer-scaling": True},
                                    {"soft-prompt-tuning": {"enabled": False}}, {"precision": "bfloat16"}])
def test_equivalent_settings_are_accepted(change):
    check_neox_yml({**PYTHIA_160M_MODEL, **change})


def test_unknown_keys_and_dropout_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="pythia_jax.convert.neox_yml_keys"):
        check_neox_yml({**PYTHIA_160M_MODEL, "my-new-key": 1, "hidden-dropout": 0.1})
    assert "my-new-key" in caplog.text and "hidden-dropout=0.1" in caplog.text


def test_reader_refuses_before_reading_tensors(tmp_path):
    """Through read_neox_checkpoint: the yml error, not a 'missing tensors' one."""
    pytest.importorskip("torch")
    import os

    from test_convert import build, write_yml

    from pythia_jax.convert import neox

    step_dir, yml, _ = build(tmp_path)
    write_yml(step_dir, {**yml, "no-weight-tying": False})
    for name in os.listdir(step_dir):  # the head's file is what a tied model lacks
        if name.startswith("layer_05"):
            os.remove(os.path.join(step_dir, name))
    with pytest.raises(ConfigError, match="no-weight-tying=False"):
        neox.read_neox_checkpoint(step_dir)


def test_integer_settings_of_the_wrong_type_are_one_line_errors(caplog):
    """'num-layers: two' gave a ValueError traceback, and 2.5 was truncated to 2."""
    from pythia_jax.convert.neox.yml import config_from_yml, neox_yml, optimizer_settings

    base = neox_yml(ModelConfig(vocab_size=50304, hidden_size=64, num_layers=2, num_heads=4))
    for key, value in (("num-layers", "two"), ("hidden-size", "abc"), ("num-layers", 2.5),
                       ("num-attention-heads", True)):
        with pytest.raises(ConfigError, match=rf"GPT-NeoX config: {key} = {value!r} is not an integer"):
            config_from_yml({**base, key: value}, vocab_size=50304, intermediate_size=256)
    assert config_from_yml({**base, "num-layers": "2"}, vocab_size=50304, intermediate_size=256).num_layers == 2
    with pytest.raises(ConfigError, match="train-iters = 'many' is not an integer"):
        optimizer_settings({**base, "train-iters": "many"})
    # a vocabulary GPT-NeoX cannot pad the named tokenizer to: said when the yml is written
    with caplog.at_level(logging.WARNING):
        neox_yml(ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4))
    assert "vocab_size 128 is below the 50277 ids of the GPT-NeoX-20B tokenizer" in caplog.text
