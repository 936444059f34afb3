"""The DenseNet-BC family and the converters to torchvision, Keras Applications and the Gluon model zoo.

The peer tests build the peer's own densenet121 with random weights (BatchNorm statistics
randomised too), convert its weights into the canonical format, load them into our backends and
compare logits on the same input. torchvision's package does not import beside the CPU torch
2.13.0 pinned here, so its pure-Python model code is loaded without the compiled extension
(tests/helpers.py::torchvision_densenet; docs/family.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.arch import canonical_spec, count_macs, count_params
from common.cli import main
from common.config import CONFIGS, DenseNetConfig, named_config
from common.errors import ConfigError, WeightFileError
from common.weights import peers
from common.weights.canonical import init_canonical, load_weights
from common.weights.safetensors_io import load_file, read_weights, write_weights
from tests.helpers import get_adapter, run_cli, torchvision_densenet

D121 = CONFIGS["densenet121"]
PUBLISHED = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
}
# Peers vs our float32 backends on random densenet121 weights: measured 5.4e-7 at most.
PEER_ATOL = 1e-5


@pytest.mark.parametrize(("name", "params"), PUBLISHED.items())
def test_published_parameter_counts(name: str, params: int) -> None:
    assert count_params(CONFIGS[name]) == params


def test_densenet264_and_costs() -> None:
    assert 33.2e6 < count_params(CONFIGS["densenet264"]) < 33.4e6  # the paper: "about 33.3 M"
    assert abs(count_macs(D121, 224) - 2.83e9) < 0.01e9  # the "2.9 GFLOPs" are multiply-adds


def test_named_config() -> None:
    assert named_config("DenseNet121") is D121
    assert named_config("densenet121", num_classes=10, in_channels=1).num_classes == 10
    with pytest.raises(ConfigError, match="unknown configuration 'densenet99'"):
        named_config("densenet99")


@pytest.mark.parametrize(
    "field", [{"bn_size": 0}, {"compression": 0.0}, {"compression": 1.5}, {"drop_rate": 1.0}, {"conv_bias": "no"}]
)
def test_bc_fields_are_validated(field: dict) -> None:
    with pytest.raises(ConfigError):
        D121.replace(**field)


def test_densenet121_in_every_backend(adapter, rng) -> None:
    """Published parameter count and the plan's stage shapes at a non-ImageNet size and channel count."""
    config = D121.replace(num_classes=7, in_channels=1)
    model = adapter.build(config)
    assert adapter.num_params(model) == count_params(config)
    X = rng.random((1, 1, 40, 40), dtype=np.float32)
    from common.arch import plan

    assert {k: v.shape for k, v in adapter.stages(model, X).items()} == plan(config, 40).shapes(1)


def test_dropout_only_acts_in_training(adapter, rng) -> None:
    config = DenseNetConfig(num_channels=16, growth_rate=16, arch=(2, 2), bn_size=2, drop_rate=0.5, conv_bias=False)
    model = adapter.build(config)
    X = rng.random((4, 1, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(adapter.forward(model, X), adapter.forward(model, X))
    a = adapter.stages(model, X, training=True)["dense1"]
    b = adapter.stages(model, X, training=True)["dense1"]
    assert not np.array_equal(a, b), "dropout drew the same mask twice"
    assert np.mean(a[:, 16:] == 0) > 0.3  # new features: half dropped (plus ReLU-free zeros are rare)


# ------------------------------------------------------------------------------------------------
# Converters without any peer installed


def test_torchvision_names() -> None:
    names = peers.torchvision_names(D121)
    assert names["stem.conv.weight"] == "features.conv0.weight"
    assert names["stem.bn.running_var"] == "features.norm0.running_var"
    assert names["dense2.conv3.bottleneck.bn.weight"] == "features.denseblock2.denselayer3.norm1.weight"
    assert names["dense2.conv3.bottleneck.conv.weight"] == "features.denseblock2.denselayer3.conv1.weight"
    assert names["dense2.conv3.bn.bias"] == "features.denseblock2.denselayer3.norm2.bias"
    assert names["dense2.conv3.conv.weight"] == "features.denseblock2.denselayer3.conv2.weight"
    assert names["transition3.conv.weight"] == "features.transition3.conv.weight"
    assert names["head.bn.weight"] == "features.norm5.weight"
    assert names["head.fc.weight"] == "classifier.weight"


def test_keras_names() -> None:
    names = peers.keras_names(D121)
    assert names["stem.conv.weight"] == "conv1_conv/kernel"
    assert names["dense1.conv6.bottleneck.bn.running_mean"] == "conv2_block6_0_bn/moving_mean"
    assert names["dense4.conv16.conv.weight"] == "conv5_block16_2_conv/kernel"
    assert names["transition1.bn.weight"] == "pool2_bn/gamma"
    assert names["head.fc.bias"] == "predictions/bias"


@pytest.mark.parametrize("fmt", ["torchvision", "keras"])
@pytest.mark.parametrize("name", ["densenet121", "densenet161"])
def test_round_trip_and_inferred_config(fmt: str, name: str) -> None:
    config = CONFIGS[name]
    w = init_canonical(config, 0)
    to, back = {
        "torchvision": (peers.to_torchvision, peers.from_torchvision),
        "keras": (peers.to_keras, peers.from_keras),
    }[fmt]
    exported = to(w, config)
    assert peers.infer_config(list(exported), {k: v.shape for k, v in exported.items()}, fmt) is config
    again = back(exported, config)
    assert list(again) == list(canonical_spec(config))
    for k in w:
        np.testing.assert_array_equal(again[k], w[k], err_msg=k)


def test_keras_epsilon_is_folded_into_the_running_variance() -> None:
    w = init_canonical(D121, 0)
    exported = peers.to_keras(w, D121)
    np.testing.assert_allclose(
        exported["conv1_bn/moving_variance"], w["stem.bn.running_var"] - peers.KERAS_EPS_SHIFT, rtol=1e-6
    )


def test_torchvision_legacy_keys_and_num_batches_tracked() -> None:
    w = init_canonical(D121, 0)
    sd = peers.to_torchvision(w, D121)
    assert sd["features.norm0.num_batches_tracked"].dtype == np.int64
    legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in sd.items()}
    again = peers.from_torchvision(legacy, D121)
    np.testing.assert_array_equal(again["dense1.conv1.conv.weight"], w["dense1.conv1.conv.weight"])


def test_import_reports_every_problem_at_once() -> None:
    sd = peers.to_torchvision(init_canonical(D121, 0), D121)
    del sd["features.conv0.weight"]
    sd["features.extra.weight"] = np.zeros(3, np.float32)
    sd["classifier.weight"] = np.zeros((1000, 1024, 1), np.float32)
    sd["classifier.bias"] = np.zeros(999, np.float32)
    with pytest.raises(WeightFileError) as exc:
        peers.from_torchvision(sd, D121)
    message = str(exc.value)
    for fragment in (
        "missing 1 tensor(s): features.conv0.weight",
        "unexpected 1 tensor(s): features.extra.weight",
        "classifier.weight: expected 2 dimensions",
    ):
        assert fragment in message


def test_misshaped_peer_tensor_is_reported() -> None:
    sd = peers.to_torchvision(init_canonical(D121, 0), D121)
    sd["classifier.bias"] = np.zeros(999, np.float32)
    with pytest.raises(WeightFileError, match=r"head.fc.bias: expected shape \(1000,\), got \(999,\)"):
        peers.from_torchvision(sd, D121)


def test_the_book_network_has_no_peer_layout() -> None:
    with pytest.raises(WeightFileError, match="bottleneck"):
        peers.torchvision_names(CONFIGS["d2l"])


def test_gluon_order_is_checked() -> None:
    names = [f"densenet0_p{i}_weight" for i in range(len(canonical_spec(D121)))]
    with pytest.raises(WeightFileError, match="does not look like stem.bn.weight"):
        peers.gluon_names(D121, names)


def test_cli_convert_from_and_to_peer_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = init_canonical(D121, 1)
    write_weights(peers.to_torchvision(w, D121), tmp_path / "tv.safetensors")
    assert (
        main(
            [
                "convert",
                "--from",
                str(tmp_path / "tv.safetensors"),
                "--from-format",
                "torchvision",
                "--to",
                str(tmp_path / "c.safetensors"),
            ]
        )
        == 0
    )
    config, again = load_weights(tmp_path / "c.safetensors")
    assert config == D121
    assert all(np.array_equal(again[k], w[k]) for k in w)
    assert (
        main(
            [
                "convert",
                "--from",
                str(tmp_path / "c.safetensors"),
                "--to",
                str(tmp_path / "k.npz"),
                "--to-format",
                "keras",
            ]
        )
        == 0
    )
    tensors, _ = read_weights(tmp_path / "k.npz")
    assert "conv5_block16_2_conv/kernel" in tensors
    assert (
        main(
            [
                "convert",
                "--from",
                str(tmp_path / "c.safetensors"),
                "--to",
                str(tmp_path / "x.npz"),
                "--to-format",
                "caffe",
            ]
        )
        == 2
    )
    assert "unknown format 'caffe'" in capsys.readouterr().err


class _FakeZoo:
    """Stands in for the MXNet adapter: names the zoo's parameters the way Gluon does."""

    framework = "fake"

    def gluon_zoo_names(self, name: str, num_classes: int) -> list[str]:
        assert (name, num_classes) == ("densenet121", 1000)
        bn = {"weight": "gamma", "bias": "beta"}
        return [
            f"zoo0_p{i}_{bn.get(leaf, leaf) if prefix.endswith('bn') else leaf}"
            for i, (prefix, leaf) in enumerate(k.rsplit(".", 1) for k in canonical_spec(D121))
        ]


def test_cli_gluon_export_asks_the_backend_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The neutral core gets the model zoo's names from the MXNet backend, through the registry."""
    asked = []
    monkeypatch.setattr("common.cli.weights.load_backend", lambda name: asked.append(name) or _FakeZoo())
    src, dst = tmp_path / "c.safetensors", tmp_path / "g.npz"
    assert main(["init", "--out", str(src), "--config", "densenet121"]) == 0
    assert main(["convert", "--from", str(src), "--to", str(dst), "--to-format", "gluon"]) == 0
    assert asked == ["mxnet"]
    tensors, _ = read_weights(dst)
    assert list(tensors) == _FakeZoo().gluon_zoo_names("densenet121", 1000)
    monkeypatch.setattr("common.cli.weights.load_backend", lambda name: object())
    assert main(["convert", "--from", str(src), "--to", str(tmp_path / "x.npz"), "--to-format", "gluon"]) == 2
    assert "cannot name the Gluon model zoo's parameters" in capsys.readouterr().err


def test_compare_accepts_a_named_config(capsys: pytest.CaptureFixture[str], backend_name, adapter) -> None:
    assert (
        main(
            [
                "compare",
                "--config",
                "densenet121",
                "--num-classes",
                "10",
                "--input-size",
                "32",
                "--backends",
                backend_name,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "bn_size=4" in out and "OK: 1 backend(s) agree" in out


# ------------------------------------------------------------------------------------------------
# The real peers


def _randomise_bn(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith(("gamma", "running_var", "moving_variance")):
        return rng.uniform(0.5, 1.5, shape)
    return rng.uniform(-0.1, 0.1, shape)


def _keras_weights(model) -> dict[str, np.ndarray]:
    """``{"layer/variable": array}`` of a Keras model (variable names without the layer path)."""
    return {
        f"{layer.name}/{variable.name.split('/')[-1]}": np.asarray(variable.numpy())
        for layer in model.layers
        for variable in layer.weights
    }


@pytest.fixture(scope="module")
def keras_peer(request: pytest.FixtureRequest):
    get_adapter("tf", request.config)  # skips (or fails if required) without TensorFlow
    import tensorflow as tf

    keras = tf.keras
    model = keras.applications.DenseNet121(
        weights=None, input_shape=(64, 64, 3), classes=1000, classifier_activation=None
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            names = ("gamma", "beta", "moving_mean", "moving_variance")
            layer.set_weights([_randomise_bn(rng, n, w.shape) for n, w in zip(names, layer.get_weights())])
    X = rng.random((2, 3, 64, 64), dtype=np.float32)
    logits = model(np.transpose(X, (0, 2, 3, 1)), training=False).numpy()
    return _keras_weights(model), X, logits


@pytest.mark.tf
def test_keras_applications_densenet121(keras_peer, adapter) -> None:
    weights, X, expected = keras_peer
    config = peers.infer_config(list(weights), {k: v.shape for k, v in weights.items()}, "keras")
    assert config is D121
    model = adapter.build(config)
    adapter.set_weights(model, peers.from_keras(weights, config))
    np.testing.assert_allclose(adapter.stages(model, X)["head"], expected, rtol=0, atol=PEER_ATOL)


@pytest.fixture(scope="module")
def gluon_peer(request: pytest.FixtureRequest):
    get_adapter("mxnet", request.config)
    from densenet_mxnet._compat import mxnet as mx

    net = mx.gluon.model_zoo.vision.densenet121(pretrained=False)
    net.initialize(mx.init.Xavier())
    rng = np.random.default_rng(1)
    # The model zoo ends in a fixed 7x7 average pool: only 224x224 (7x7 at the end) is averaged right.
    X = rng.random((1, 3, 224, 224), dtype=np.float32)
    net(mx.nd.array(X))
    params = net.collect_params()
    for name, p in params.items():
        if "batchnorm" in name:
            p.set_data(mx.nd.array(_randomise_bn(rng, name, p.shape)))
    logits = net(mx.nd.array(X)).asnumpy()
    return {k: p.data().asnumpy() for k, p in params.items()}, X, logits


@pytest.mark.mxnet
def test_gluon_model_zoo_densenet121(gluon_peer, adapter) -> None:
    params, X, expected = gluon_peer
    weights = peers.from_gluon(params, D121)
    back = peers.to_gluon(weights, D121, list(params))
    assert all(np.array_equal(back[k], params[k]) for k in params)
    model = adapter.build(D121)
    adapter.set_weights(model, weights)
    np.testing.assert_allclose(adapter.stages(model, X)["head"], expected, rtol=0, atol=PEER_ATOL)


@pytest.mark.mxnet
def test_gluon_zoo_names_from_the_mxnet_backend(request: pytest.FixtureRequest) -> None:
    adapter = get_adapter("mxnet", request.config)
    names = adapter.gluon_zoo_names("densenet121", 10)
    assert list(peers.gluon_names(D121, names)) == list(canonical_spec(D121))
    with pytest.raises(WeightFileError, match="no densenet264 network"):
        adapter.gluon_zoo_names("densenet264", 1000)


def test_torchvision_densenet121(adapter, request: pytest.FixtureRequest) -> None:
    """torchvision's own densenet121 code (tests/helpers.py::torchvision_densenet), random weights
    and statistics, converted by common.weights.peers: the same logits in every backend."""
    densenet = torchvision_densenet(request.config)
    import torch

    torch.manual_seed(0)
    net = densenet.densenet121(weights=None).eval()
    rng = np.random.default_rng(2)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if "norm" in name and t.is_floating_point():
                leaf = {"weight": "gamma", "bias": "beta"}.get(name.rsplit(".", 1)[1], name.rsplit(".", 1)[1])
                t.copy_(torch.from_numpy(_randomise_bn(rng, leaf, tuple(t.shape))))
    X = rng.random((1, 3, 64, 64), dtype=np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(X)).numpy()
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    model = adapter.build(D121)
    adapter.set_weights(model, peers.from_torchvision(sd, D121))
    np.testing.assert_allclose(adapter.stages(model, X)["head"], expected, rtol=0, atol=PEER_ATOL)


TORCHVISION_VECTOR = Path(__file__).parent / "data" / "torchvision_small.safetensors"


def test_torchvision_recorded_vector(adapter) -> None:
    """torchvision's own DenseNet, run where it imports (tests/data/make_torchvision_vector.py):
    its state dict, converted by common.weights.peers, gives torchvision's logits in every backend."""
    tensors, metadata = load_file(TORCHVISION_VECTOR)
    sd = {k.removeprefix("state_dict/"): v for k, v in tensors.items() if k.startswith("state_dict/")}
    config = peers.infer_config(list(sd), {k: v.shape for k, v in sd.items()}, "torchvision")
    args = json.loads(metadata["densenet_args"])
    assert (config.growth_rate, config.arch, config.num_channels) == (
        args["growth_rate"],
        tuple(args["block_config"]),
        args["num_init_features"],
    )
    assert config.bn_size == args["bn_size"] and config.num_classes == args["num_classes"]
    model = adapter.build(config)
    adapter.set_weights(model, peers.from_torchvision(sd, config))
    got = adapter.forward(model, tensors["input"])
    np.testing.assert_allclose(got, tensors["logits"], rtol=0, atol=PEER_ATOL)


# ------------------------------------------------------------------------------------------------
# convert: --config and the network options are honoured, and a peer file's network is inferred

TINY = DenseNetConfig(num_channels=8, growth_rate=4, arch=(2, 2))
TINY_ARGS = ["--num-channels", "8", "--growth-rate", "4", "--arch", "2,2"]
D121_10 = D121.replace(num_classes=10)


def _zoo_like_names(config: DenseNetConfig) -> list[str]:
    """Gluon-style parameter names (block counters, the leaf last) in forward order."""
    bn = {"weight": "gamma", "bias": "beta"}
    return [
        f"zoo0_p{i}_{bn.get(leaf, leaf) if prefix.endswith('bn') else leaf}"
        for i, (prefix, leaf) in enumerate(k.rsplit(".", 1) for k in canonical_spec(config))
    ]


def _convert(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code, _, err = run_cli(capsys, "convert", *argv)
    return code, err


def test_convert_config_states_what_a_canonical_file_must_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "tiny.safetensors", tmp_path / "out.npz"
    assert main(["init", "--out", str(src), *TINY_ARGS]) == 0
    code, err = _convert(capsys, "--from", src, "--to", out, "--config", "d2l")
    assert code == 2 and "weights are for a different network" in err and "growth_rate: file has 4, expected 32" in err
    code, err = _convert(capsys, "--from", src, "--to", out, *TINY_ARGS, "--num-classes", "3")
    assert code == 2 and "num_classes: file has 10, expected 3" in err
    assert not out.exists()
    assert _convert(capsys, "--from", src, "--to", out, *TINY_ARGS)[0] == 0
    assert load_weights(out)[0] == TINY


def test_convert_infers_a_gluon_file_of_any_class_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = init_canonical(D121_10, 0)
    src = tmp_path / "zoo10.npz"
    write_weights(peers.to_gluon(weights, D121_10, _zoo_like_names(D121_10)), src)
    for options in ([], ["--config", "densenet121", "--num-classes", "10"]):
        out = tmp_path / f"out{len(options)}.safetensors"
        code, err = _convert(capsys, "--from", src, "--from-format", "gluon", "--to", out, *options)
        assert code == 0, err
        config, back = load_weights(out)
        assert config == D121_10
        assert all(np.array_equal(back[k], weights[k]) for k in weights)
    wrong = ("--config", "densenet121")  # 1000 classes
    code, err = _convert(capsys, "--from", src, "--from-format", "gluon", "--to", tmp_path / "x.npz", *wrong)
    assert code == 2 and "num_classes: weights have 10, network has 1000" in err
    assert len(err.splitlines()) < 16  # summarised, not a line per tensor
    d169 = CONFIGS["densenet169"]
    names = _zoo_like_names(d169)
    assert peers.infer_config(names, dict(zip(names, canonical_spec(d169).values())), "gluon") == d169


def test_convert_exports_gluon_for_any_class_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Zoo:
        def gluon_zoo_names(self, name: str, num_classes: int) -> list[str]:
            assert (name, num_classes) == ("densenet121", 10)
            return _zoo_like_names(D121_10)

    monkeypatch.setattr("common.cli.weights.load_backend", lambda name: Zoo())
    src, dst = tmp_path / "c.safetensors", tmp_path / "g.npz"
    assert main(["init", "--out", str(src), "--config", "densenet121", "--num-classes", "10"]) == 0
    code, err = _convert(capsys, "--from", src, "--to", dst, "--to-format", "gluon")
    assert code == 0, err
    assert list(read_weights(dst)[0]) == _zoo_like_names(D121_10)
