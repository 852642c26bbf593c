"""ModelConfig presets against the released configs (the Pythia paper's Table 1, the HF config.json
files), parameter counts from abstract shapes, the HF config.json round trip, and the per-model gin
files."""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path

import gin
import jax
import pytest

from pythia_jax import config as config_module
from pythia_jax import gin_setup
from pythia_jax.config import (
    HF_FIELDS,
    ConfigError,
    ModelConfig,
    check_param_shapes,
    param_shapes,
    parse_preset_name,
    preset_names,
)
from pythia_jax.errors import CheckpointError, ParamShapeError, PythiaJaxError
from pythia_jax.model import abstract_params

# The released models (EleutherAI/pythia-*/config.json on the HF Hub; init from models/*.yml of the
# EleutherAI/pythia repository): size -> (L, H, heads, head dim, rotary dims, vocab, init, in std,
# out init, out std)
FACTS = {
    "70m": (6, 512, 8, 64, 16, 50304, "small_init", "0.027951", "wang_init", "0.0147314"),
    "160m": (12, 768, 12, 64, 16, 50304, "small_init", "0.022822", "wang_init", "0.0060141"),
    "410m": (24, 1024, 16, 64, 16, 50304, "small_init", "0.019764", "wang_init", "0.0026042"),
    "1b": (16, 2048, 8, 256, 64, 50304, "small_init", "0.013975", "wang_init", "0.0027621"),
    "1.4b": (24, 2048, 16, 128, 32, 50304, "small_init", "0.013975", "wang_init", "0.0018414"),
    "2.8b": (32, 2560, 32, 80, 20, 50304, "small_init", "0.012500", "wang_init", "0.0012353"),
    "6.9b": (32, 4096, 32, 128, 32, 50432, "normal", "0.02", "scaled_normal", "0.0025"),
    "12b": (36, 5120, 40, 128, 32, 50688, "normal", "0.02", "scaled_normal", "0.002357"),
}
EXTRAS = {"14m": (6, 128, 4), "31m": (6, 256, 8)}
TOTAL_PARAMS = {"70m": 70_426_624, "160m": 162_322_944, "1.4b": 1_414_647_808, "12b": 11_846_072_320}

RELEASED = [f"pythia-{size}{suffix}" for size in FACTS for suffix in ("", "-deduped")]


def _size(name: str) -> str:
    return name[len("pythia-"):].replace("-deduped", "")


def _count_from_shapes(config: ModelConfig) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(abstract_params(config)))


def _close_to_given_digits(value: float, given: str) -> bool:
    """value rounds to ``given`` at the number of decimals written in ``given``."""
    exponent = Decimal(given).as_tuple().exponent
    return abs(Decimal(repr(value)) - Decimal(given)) <= Decimal(5) * Decimal(10) ** (exponent - 1)


def test_preset_names_cover_the_suite():
    names = preset_names()
    assert len(names) == 18 and len(set(names)) == 18
    assert set(RELEASED) | {"pythia-14m", "pythia-31m"} == set(names)


@pytest.mark.parametrize("name", RELEASED)
def test_released_preset_matches_facts(name):
    L, H, heads, head_dim, rot, vocab, init, in_std, out_init, out_std = FACTS[_size(name)]
    c = ModelConfig.preset(name)
    assert c.name == name
    assert (c.num_layers, c.hidden_size, c.num_heads, c.head_dim, c.rotary_ndims, c.vocab_size) == (
        L, H, heads, head_dim, rot, vocab)
    assert c.intermediate_size == 4 * H
    assert (c.rotary_pct, c.rotary_emb_base, c.layer_norm_eps) == (0.25, 10000.0, 1e-5)
    assert c.use_parallel_residual and c.hidden_act == "gelu" and c.max_position_embeddings == 2048
    assert (c.init_method, c.output_init_method) == (init, out_init)
    assert _close_to_given_digits(c.input_init_std, in_std), (c.input_init_std, in_std)
    assert _close_to_given_digits(c.output_init_std, out_std), (c.output_init_std, out_std)
    # parameter count from abstract shapes (no memory): the formula, and the published totals
    count = _count_from_shapes(c)
    assert count == L * (12 * H * H + 13 * H) + 2 * H + 2 * vocab * H
    assert count == c.num_params()
    if _size(name) in TOTAL_PARAMS:
        assert count == TOTAL_PARAMS[_size(name)]


@pytest.mark.parametrize("size", list(EXTRAS))
def test_extra_presets(size):
    L, H, heads = EXTRAS[size]
    c = ModelConfig.preset(f"pythia-{size}")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.vocab_size) == (L, H, heads, 50304)
    assert _count_from_shapes(c) == L * (12 * H * H + 13 * H) + 2 * H + 2 * 50304 * H


def test_preset_name_spellings():
    assert ModelConfig.preset("EleutherAI/pythia-1b-deduped") == ModelConfig.preset("pythia-1b-deduped")
    assert ModelConfig.preset("160m").hidden_size == 768
    assert ModelConfig.preset("pythia-160m", dtype="bfloat16").dtype == "bfloat16"


@pytest.mark.parametrize("bad", ["pythia-13b", "gpt2", ""])
def test_unknown_model_name(bad):
    with pytest.raises(ConfigError, match="unknown model name"):
        ModelConfig.preset(bad)


CUSTOM = ModelConfig(vocab_size=1001, hidden_size=160, num_layers=3, num_heads=2, rotary_pct=0.5,
                     rotary_emb_base=20000.0, use_parallel_residual=False, hidden_act="gelu_new",
                     layer_norm_eps=1e-6, max_position_embeddings=4096, intermediate_size=500)


@pytest.mark.parametrize("config", [ModelConfig.preset("pythia-2.8b"), CUSTOM], ids=["2.8b", "custom"])
@pytest.mark.parametrize("keys", ["both", "legacy", "rope_parameters"])
def test_hf_dict_round_trip(config, keys):
    hf = config.to_hf_dict()
    assert hf["eos_token_id"] == 0 and hf["bos_token_id"] == 0 and hf["tie_word_embeddings"] is False
    if keys == "legacy":
        del hf["rope_parameters"]
    elif keys == "rope_parameters":
        del hf["rotary_pct"], hf["rotary_emb_base"]
    assert ModelConfig.from_hf_dict(hf) == config  # the name too (a preset stays recognisable)


def test_hf_dict_through_transformers_config():
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPTNeoXConfig(**CUSTOM.to_hf_dict()).to_dict()
    assert ModelConfig.from_hf_dict(hf) == CUSTOM
    legacy = {k: v for k, v in CUSTOM.to_hf_dict().items() if k != "rope_parameters"}
    loaded = transformers.GPTNeoXConfig(**legacy).to_dict()
    assert ModelConfig.from_hf_dict(loaded) == CUSTOM


def test_hf_dict_errors():
    hf = ModelConfig.preset("pythia-70m").to_hf_dict()
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf_dict({**hf, "model_type": "llama"})
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf_dict({k: v for k, v in hf.items() if k != "hidden_size"})


@pytest.mark.parametrize("name", preset_names())
def test_model_gin_file_matches_preset(name):
    gin_setup.parse([f"models/{name}.gin"])
    try:
        parsed = gin.get_configurable("pythia_jax.ModelConfig")()
    finally:
        gin.clear_config()
    assert parsed == ModelConfig.preset(name)
    # every architecture field is written out explicitly
    text = (gin_setup.REPO_CONFIG_DIR / "models" / f"{name}.gin").read_text()
    for field in ("name", "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "rotary_pct", "rotary_emb_base", "max_position_embeddings", "use_parallel_residual",
                  "hidden_act", "layer_norm_eps", "init_method", "output_init_method"):
        assert f"ModelConfig.{field} = " in text, field


def test_gin_binding_overrides_file():
    gin_setup.parse(["models/pythia-70m.gin"], ["ModelConfig.dtype = 'bfloat16'"])
    try:
        parsed = gin.get_configurable("pythia_jax.ModelConfig")()
    finally:
        gin.clear_config()
    assert parsed == ModelConfig.preset("pythia-70m", dtype="bfloat16")


# ------------------------------------------------------------------ names survive the HF round trip
@pytest.mark.parametrize("name", ["pythia-160m", "pythia-6.9b-deduped", "pythia-14m"])
def test_preset_name_survives_hf_round_trip(name):
    preset = ModelConfig.preset(name)
    assert ModelConfig.from_hf_dict(preset.to_hf_dict()) == preset
    # a released config.json has no pythia_jax_name: the preset is recognised by its architecture,
    # and its init methods come with it (6.9b: normal / scaled_normal)
    released = {k: v for k, v in preset.to_hf_dict().items() if k != "pythia_jax_name"}
    base = parse_preset_name(name).base
    assert ModelConfig.from_hf_dict(released) == ModelConfig.preset(base)
    assert ModelConfig.from_hf_dict({**released, "_name_or_path": f"EleutherAI/{name}"}) == preset


def test_custom_name_and_shape_kept_through_hf():
    assert ModelConfig.from_hf_dict(CUSTOM.replace(name="mine").to_hf_dict()).name == "mine"
    unnamed = {k: v for k, v in CUSTOM.to_hf_dict().items() if k != "pythia_jax_name"}
    assert ModelConfig.from_hf_dict(unnamed).name == "custom"
    # a preset's name on another shape is not mistaken for the preset's init
    other = ModelConfig.preset("pythia-6.9b", num_layers=2)
    assert ModelConfig.from_hf_dict(other.to_hf_dict()).init_method == "small_init"


# ------------------------------------------------------------------ one preset-name normaliser
SPELLINGS = {
    "pythia-160m": ("pythia-160m", "pythia-160m"),
    "EleutherAI/pythia-160m": ("pythia-160m", "pythia-160m"),
    "pythia-160m-v0": ("pythia-160m-v0", "pythia-160m"),
    "EleutherAI/pythia-160m-deduped-v0": ("pythia-160m-deduped-v0", "pythia-160m"),
    "Pythia-1.4B-Deduped": ("pythia-1.4b-deduped", "pythia-1.4b"),
    "1b": ("pythia-1b", "pythia-1b"),
    " 14m ": ("pythia-14m", "pythia-14m"),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_one_preset_normaliser_for_preset_and_recipe(spelling):
    from pythia_jax.train.config import pythia_recipe

    name, base = SPELLINGS[spelling]
    assert parse_preset_name(spelling) == (name, base)
    assert ModelConfig.preset(spelling).name == name
    recipe = pythia_recipe(spelling)
    assert recipe.model == ModelConfig.preset(spelling)
    assert recipe.optimizer.max_lr == config_module.PRESET_MAX_LR[base]


@pytest.mark.parametrize("bad", ["pythia-13b", "gpt2", "", "someone/pythia-160m", "pythia-160m-v1"])
def test_unknown_names_are_config_errors_in_preset_and_recipe(bad):
    from pythia_jax.train.config import pythia_recipe

    with pytest.raises(ConfigError, match="unknown model name"):
        ModelConfig.preset(bad)
    with pytest.raises(ConfigError, match="unknown model name"):
        pythia_recipe(bad)


# ------------------------------------------------------------------ error hierarchy
def test_config_error_is_a_pythia_jax_error():
    from pythia_jax import errors

    assert config_module.ConfigError is errors.ConfigError
    with pytest.raises(PythiaJaxError):
        ModelConfig(hidden_size=-1)
    try:
        ModelConfig.preset("pythia-3b")
    except PythiaJaxError as e:  # what the CLI catches
        assert isinstance(e, ConfigError) and isinstance(e, ValueError)
    else:
        raise AssertionError("no error")


# ------------------------------------------------------------------ one parameter-shape source and check
@pytest.mark.parametrize("config", [ModelConfig.preset("pythia-70m"), CUSTOM], ids=["70m", "custom"])
def test_param_shapes_is_what_the_model_builds(config):
    from pythia_jax.model import abstract_params

    built = {tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
             for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(config))}
    assert built == param_shapes(config)
    assert config.num_params() == sum(math.prod(s) for s in built.values())
    embeddings = 2 * config.vocab_size * config.hidden_size
    assert config.num_params(include_embeddings=False) == config.num_params() - embeddings


def test_one_param_check_everywhere():
    import numpy as np

    from pythia_jax.convert import hf as hfc
    from pythia_jax.model import check_params

    tiny = ModelConfig(vocab_size=11, hidden_size=16, num_layers=2, num_heads=2)
    params = {}
    for path, shape in param_shapes(tiny).items():
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.zeros(shape, np.float32)
    check_param_shapes(tiny, params)
    wrong = {**params, "final_layer_norm": {"scale": np.zeros(16), "bias": np.zeros(7)}}
    missing = {k: v for k, v in params.items() if k != "embed_out"}
    extra = {**params, "lm_head": {"kernel": np.zeros((16, 11))}}
    for bad, pattern in ((wrong, r"final_layer_norm/bias has shape \[7\], expected \[16\]"),
                         (missing, r"missing \['embed_out/kernel'\]"),
                         (extra, r"unexpected \['lm_head/kernel'\]")):
        for check in (check_param_shapes, check_params, hfc._check_params):
            with pytest.raises(ParamShapeError, match=pattern) as info:
                check(tiny, bad)
            assert isinstance(info.value, ConfigError) and isinstance(info.value, CheckpointError)


# ------------------------------------------------------------------ every GPTNeoXConfig field has a rule
def test_every_gptneox_config_field_is_handled_by_name():
    """New transformers fields fail here until HF_FIELDS says what happens to them."""
    transformers = pytest.importorskip("transformers")
    fields = set(transformers.GPTNeoXConfig().to_dict())
    fields |= set(transformers.GPTNeoXConfig(**CUSTOM.to_hf_dict()).to_dict())
    missing = sorted(fields - set(HF_FIELDS))
    assert not missing, f"add these GPTNeoXConfig fields to config.HF_FIELDS: {missing}"
    assert {kind for kind, _ in HF_FIELDS.values()} == {"read", "weights", "checked", "ignored"}
    assert all(note for _, note in HF_FIELDS.values())


REFUSED = [
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"architectures": ["GPTNeoXModel"]}, r"architectures=\['GPTNeoXModel'\]"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type='yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
    ({"rope_parameters": "default"}, "rope_parameters='default'"),
    ({"rotary_pct": 0.5}, r"rotary_pct=0.5 but transformers' GPTNeoXConfig uses "
                          r"rope_parameters.partial_rotary_factor = 0.25; make them agree or remove rotary_pct"),
    ({"rope_theta": 500}, r"rope_theta=500 but transformers' GPTNeoXConfig uses rope_parameters.rope_theta = "
                          r"10000.0 and ignores the top-level key"),
    ({"hidden_act": "silu"}, "hidden_act='silu'"),
    ({"is_encoder_decoder": True}, "is_encoder_decoder=True"),
    ({"add_cross_attention": True}, "add_cross_attention=True"),
    ({"pruned_heads": {"0": [1]}}, "pruned_heads="),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config="),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes'"),
    ({"attention_bias": 0}, "attention_bias=0"),
    ({"hidden_size": 64.5}, "hidden_size=64.5"),
    ({"layer_norm_eps": "1e-5"}, "layer_norm_eps='1e-5'"),
    ({"num_hidden_layers": None}, "missing required keys: num_hidden_layers"),
]


@pytest.mark.parametrize("change,pattern", REFUSED, ids=[p for _, p in REFUSED])
def test_unsupported_hf_settings_are_refused_by_name(change, pattern):
    hf = {**ModelConfig.preset("pythia-70m").to_hf_dict(), **change}
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig.from_hf_dict(hf)


def test_hf_keys_unknown_or_unused_are_logged(caplog):
    hf = {**CUSTOM.to_hf_dict(), "my_new_field": 3, "hidden_dropout": 0.1}
    with caplog.at_level("WARNING", logger="pythia_jax.config"):
        assert ModelConfig.from_hf_dict(hf) == CUSTOM
    text = caplog.text
    assert "my_new_field" in text and "hidden_dropout=0.1" in text


# ------------------------------------------------------------------ field types and ranges
@pytest.mark.parametrize("make, message", [
    (lambda: _train(num_steps="abc"), "TrainConfig.num_steps must be an integer, got 'abc'"),
    (lambda: _train(num_steps=1e5), "TrainConfig.num_steps must be an integer, got 100000.0"),
    (lambda: _train(start_step="3"), "TrainConfig.start_step must be an integer, got '3'"),
    (lambda: _train(tensorboard="no"), "TrainConfig.tensorboard must be True or False, got 'no'"),
    (lambda: _train(keep_checkpoints="all"), "TrainConfig.keep_checkpoints must be an integer or None, got 'all'"),
    (lambda: _train(init_from=3), "TrainConfig.init_from must be a string or None, got 3"),
    (lambda: _train(seed=2**32), "TrainConfig.seed must be an integer in [0, 2**32 - 1 = 4294967295], got 4294967296"),
    (lambda: _train(seed=-1), "TrainConfig.seed must be an integer in [0, 2**32 - 1 = 4294967295], got -1"),
    (lambda: _train(num_steps=0), "TrainConfig.num_steps must be a positive integer, got 0"),
    (lambda: _train(eval_batches=0), "TrainConfig.eval_batches must be a positive integer, got 0"),
    (lambda: _train(keep_checkpoints=0), "TrainConfig.keep_checkpoints must be >= 1 or None (keep all), got 0"),
    (lambda: _data(seed=4294967296),
     "DataConfig.seed must be an integer in [0, 2**32 - 1 = 4294967295], got 4294967296"),
    (lambda: _data(seed="1234"), "DataConfig.seed must be an integer, got '1234'"),
    (lambda: _data(prefix=None), "DataConfig.prefix must be a string, got None"),
    (lambda: _data(order="random"), "DataConfig.order must be 'neox' or 'preshuffled', got 'random'"),
    (lambda: _data(num_threads=-1), "DataConfig.num_threads must be >= 0, got -1"),
    (lambda: _optimizer(max_lr="1e-3"), "OptimizerConfig.max_lr must be a number, got '1e-3'"),
    (lambda: _optimizer(b2=1.5), "OptimizerConfig.b2 must be in [0, 1), got 1.5"),
    (lambda: _optimizer(warmup=2), "OptimizerConfig.warmup must be in [0, 1] (a fraction of decay_steps), got 2"),
    (lambda: ModelConfig(hidden_size="128"), "ModelConfig.hidden_size must be an integer, got '128'"),
    (lambda: ModelConfig(rotary_pct="0.25"), "ModelConfig.rotary_pct must be a number, got '0.25'"),
    (lambda: ModelConfig(scan_layers=1), "ModelConfig.scan_layers must be True or False, got 1"),
    (lambda: _mesh(data="2"), "MeshConfig.data must be an integer, got '2'"),
])
def test_config_values_of_the_wrong_type_or_range_are_one_line_errors(make, message):
    """A gin value the run cannot use (a string for an integer, a seed numpy's RandomState or the
    uint32 init key refuses) is a ConfigError naming the setting and what it takes, raised by the
    config class itself (every entry point), before any comparison with it can raise TypeError."""
    with pytest.raises(ConfigError) as info:
        make()
    assert str(info.value) == message


def test_config_field_types_accept_what_gin_and_python_give():
    import numpy as np

    from pythia_jax.train.config import DataConfig, OptimizerConfig, TrainConfig

    assert OptimizerConfig(max_lr=1, min_lr=0).max_lr == 1  # an int where a float is asked
    assert DataConfig(seed=2**32 - 1, transform_steps=[1, 2]).transform_steps == (1, 2)
    assert type(ModelConfig(vocab_size=np.int64(96), hidden_size=32, num_heads=2).vocab_size) is int
    cfg = TrainConfig(model=ModelConfig(hidden_size=32, num_heads=2), output_dir=Path("runs/x"),
                      checkpoint_extra_steps=[5, 7], num_steps=10)
    assert cfg.output_dir == "runs/x" and isinstance(cfg.output_dir, str)  # a Path is kept as its string


def _train(**kw):
    from pythia_jax.train.config import TrainConfig

    return TrainConfig(**{"model": ModelConfig(hidden_size=32, num_heads=2), "num_steps": 10, **kw})


def _data(**kw):
    from pythia_jax.train.config import DataConfig

    return DataConfig(**kw)


def _optimizer(**kw):
    from pythia_jax.train.config import OptimizerConfig

    return OptimizerConfig(**kw)


def _mesh(**kw):
    from pythia_jax.mesh_config import MeshConfig

    return MeshConfig(**kw)
