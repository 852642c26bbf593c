"""Mesh shapes, the logical-axis rule table and parameter / optimizer / batch shardings
(multi-device layouts run in tests/test_train_step.py on 8 simulated devices)."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from pythia_jax import sharding as shd
from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.train.config import MeshConfig
from pythia_jax.train.optimizer import build_optimizer


@pytest.mark.parametrize("cfg, n, want", [
    (MeshConfig(), 8, {"slice": 1, "data": 8, "fsdp": 1, "tensor": 1}),
    (MeshConfig(data=1, fsdp=-1), 8, {"slice": 1, "data": 1, "fsdp": 8, "tensor": 1}),
    (MeshConfig(data=-1, tensor=2), 8, {"slice": 1, "data": 4, "fsdp": 1, "tensor": 2}),
    (MeshConfig(slices=2, data=-1, fsdp=2, tensor=2), 32, {"slice": 2, "data": 4, "fsdp": 2, "tensor": 2}),
    (MeshConfig(data=2, fsdp=2, tensor=2), 8, {"slice": 1, "data": 2, "fsdp": 2, "tensor": 2}),
])
def test_resolve_mesh_shape(cfg, n, want):
    assert shd.resolve_mesh_shape(cfg, n) == want


@pytest.mark.parametrize("cfg, n, pattern", [
    (MeshConfig(data=-1, fsdp=3), 8, "does not divide the 8 devices"),
    (MeshConfig(data=2, fsdp=2), 8, "has 4 devices but 8 are available"),
    (MeshConfig(data=-1, fsdp=-1), 8, "only one mesh axis may be -1"),
    (MeshConfig(data=0), 8, "positive integer or -1"),
])
def test_resolve_mesh_shape_errors(cfg, n, pattern):
    with pytest.raises(ConfigError, match=pattern):
        shd.resolve_mesh_shape(cfg, n)


def test_make_mesh_single_device():
    mesh = shd.make_mesh(MeshConfig(), jax.devices()[:1])
    assert mesh.axis_names == shd.MESH_AXES
    assert dict(mesh.shape) == {"slice": 1, "data": 1, "fsdp": 1, "tensor": 1}


def test_param_specs_are_megatron_and_zero3():
    cfg = ModelConfig.preset("pythia-160m")
    specs = shd.param_specs(cfg)
    layer = specs["layers"]
    assert specs["embed_in"]["embedding"] == P("tensor", "fsdp")  # vocab-parallel embedding
    assert specs["embed_out"]["kernel"] == P("fsdp", "tensor")  # vocab-parallel head
    assert layer["attention"]["query_key_value"]["kernel"] == P(None, "fsdp", "tensor")  # column-parallel
    assert layer["attention"]["query_key_value"]["bias"] == P(None, "tensor")
    assert layer["attention"]["dense"]["kernel"] == P(None, "tensor", "fsdp")  # row-parallel
    assert layer["attention"]["dense"]["bias"] == P(None, "fsdp")
    assert layer["mlp"]["dense_h_to_4h"]["kernel"] == P(None, "fsdp", "tensor")
    assert layer["mlp"]["dense_4h_to_h"]["kernel"] == P(None, "tensor", "fsdp")
    assert layer["input_layernorm"]["scale"] == P(None, None)
    assert specs["final_layer_norm"]["scale"] == P(None)


def test_activation_specs_do_not_reuse_mesh_axes():
    # batch takes (slice, data, fsdp): embed -> fsdp must then be dropped for activations
    assert shd.logical_to_spec((("batch", "length"), "embed")) == P(("slice", "data", "fsdp"), None)
    assert shd.logical_to_spec(("batch", "length", "heads", "kv")) == P(("slice", "data", "fsdp"), None, "tensor", None)
    assert shd.batch_spec() == P(("slice", "data", "fsdp"), None)


def test_rule_overrides_and_unknown_names():
    rules = shd.make_rules([("embed", None), ("batch", ["data"])])
    assert dict(rules)["embed"] is None and dict(rules)["batch"] == ("data",)
    assert shd.logical_to_spec(("vocab", "embed"), rules) == P("tensor", None)
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        shd.make_rules([("heads", "model")])
    with pytest.raises(ConfigError, match="no sharding rule for logical axis 'experts'"):
        shd.logical_to_spec(("experts",))


def test_optimizer_state_shardings_follow_params():
    cfg = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4)
    mesh = shd.make_mesh(MeshConfig(), jax.devices()[:1])
    from pythia_jax.model import abstract_params

    psh = shd.param_shardings(cfg, mesh)
    osh = shd.opt_state_shardings(build_optimizer(), abstract_params(cfg), psh, mesh)
    import optax

    from pythia_jax.train.optimizer import _find

    adam = _find(osh, optax.ScaleByAdamState)[0][1]
    assert adam.mu["embed_out"]["kernel"].spec == P("fsdp", "tensor")
    assert adam.nu["layers"]["attention"]["dense"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert adam.count.spec == P()


def test_batch_checks():
    mesh = shd.make_mesh(MeshConfig(), jax.devices()[:1])
    shd.check_batch(8, 2, mesh)
    with pytest.raises(ConfigError, match="not divisible by micro_batches 3"):
        shd.check_batch(8, 3, mesh)
