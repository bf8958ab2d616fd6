"""The backbone factory: feature contract, freezing, strict weight loading, real Lite weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dedn.errors import CheckpointError, ConfigError
from dedn.models.backbones import (
    BACKBONES,
    Backbone,
    FeatureLevel,
    ResNetBackbone,
    create_backbone,
    lite_imagenet_weight_path,
)

H, W = 65, 97  # odd sizes: every level must be ceil(H / stride) x ceil(W / stride)


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return create_backbone("efficientnet_lite0", weights="imagenet", dilate=True)


@pytest.mark.parametrize("dilate", [True, False])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_levels_match_feature_info(name, dilate):
    backbone = create_backbone(name, weights=None, dilate=dilate)
    x = torch.rand(2, 3, H, W)
    with torch.no_grad():
        feats = backbone(x, levels=list(backbone.feature_info))
        default = backbone(x)
    assert list(feats) == list(backbone.feature_info)
    for level, info in backbone.feature_info.items():
        assert isinstance(info, FeatureLevel)
        expected = (2, info.channels, math.ceil(H / info.stride), math.ceil(W / info.stride))
        assert feats[level].shape == expected, level
        assert torch.isfinite(feats[level]).all()
        # random weights keep unit-scale activations (no denormals, which are ~20x slower on a CPU)
        assert feats[level].abs().mean() > 1e-2, level
    # forward(x) returns exactly the default levels, and each group has one stride
    wanted = backbone.default_levels["mid"] + backbone.default_levels["high"]
    assert set(default) == set(wanted)
    for group in ("mid", "high"):
        assert backbone.default_levels[group]
        assert len({backbone.feature_info[level].stride for level in backbone.default_levels[group]}) == 1
    max_stride = max(info.stride for info in backbone.feature_info.values())
    assert max_stride == ((8 if "resnet" in name else 16) if dilate else 32)


def test_resnet_default_levels_follow_pfenet():
    backbone = create_backbone("resnet50", dilate=True)
    assert backbone.default_levels == {"mid": ["layer2", "layer3"], "high": ["layer4"]}
    assert backbone.feature_info["layer2"] == FeatureLevel(512, 8)
    assert backbone.feature_info["layer3"] == FeatureLevel(1024, 8)
    assert backbone.feature_info["layer4"] == FeatureLevel(2048, 8)


def test_forward_stops_after_the_deepest_requested_level():
    backbone = create_backbone("resnet50")
    calls = []
    backbone.layer4.register_forward_hook(lambda *args: calls.append("layer4"))
    backbone.layer3.register_forward_hook(lambda *args: calls.append("layer3"))
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 33, 33), levels=["layer2", "layer1"])
    assert list(out) == ["layer2", "layer1"] and calls == []
    with torch.no_grad():
        backbone(torch.rand(1, 3, 33, 33), levels="layer3")
    assert calls == ["layer3"]


def test_bad_levels_and_inputs_are_rejected():
    backbone = create_backbone("efficientnet_lite0", weights=None)
    with pytest.raises(ConfigError, match="unknown feature level"):
        backbone(torch.rand(1, 3, 32, 32), levels=["layer3"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backbone(torch.rand(3, 32, 32))
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("vgg16")
    with pytest.raises(ConfigError, match="stem"):
        create_backbone("efficientnet_lite0", weights=None, stem="deep")


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0"])
def test_frozen_and_batch_norm_stays_in_eval_mode(name):
    backbone = create_backbone(name, weights=None)
    assert all(not p.requires_grad for p in backbone.parameters())
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        before = backbone(x)
    backbone.train()
    assert backbone.training
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    running_mean = norms[0].running_mean.clone()
    with torch.no_grad():
        after = backbone(x)
    assert torch.equal(norms[0].running_mean, running_mean)  # statistics not updated in "training"
    for level in before:
        assert torch.equal(before[level], after[level])
    backbone.eval()
    assert not backbone.training


def test_input_normalisation():
    x = torch.stack([torch.zeros(3, 1, 1), torch.ones(3, 1, 1)])
    lite = create_backbone("efficientnet_lite0", weights=None)
    # TF-converted weights expect (255 x - 127) / 128
    assert torch.allclose(lite.normalize(x)[0], torch.full((3, 1, 1), -127 / 128))
    assert torch.allclose(lite.normalize(x)[1], torch.full((3, 1, 1), 1.0))
    resnet = create_backbone("resnet50")
    expected = (torch.ones(3) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(resnet.normalize(x)[1].flatten(), expected)


# --- ResNet weight files -----------------------------------------------------------------------------------
def layout_state(depth: str, stem: str, with_fc: bool = True) -> dict[str, torch.Tensor]:
    """A state dict of the real layout in which every entry holds its own index as a constant.

    The constants are zero-stride expanded scalars, so the saved file stays tiny while keys and shapes are
    exactly those of the real network; after loading, each parameter tells which key it came from.
    """
    with torch.device("meta"):
        reference = ResNetBackbone(depth, stem=stem, init_weights=False).state_dict()
    state = {k: torch.tensor(i, dtype=v.dtype).expand(v.shape) for i, (k, v) in enumerate(reference.items())}
    if with_fc:
        state["fc.weight"] = torch.zeros(1).expand(1000, 2048)
        state["fc.bias"] = torch.zeros(1000)
    return state


def assert_loaded_from(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = backbone.state_dict()
    assert {k for k in state if not k.startswith("fc.")} == set(own)
    for key, value in own.items():
        assert torch.equal(value, state[key].to(value.dtype)), key


def test_resnet_loads_a_saved_torchvision_layout_file(tmp_path):
    source = ResNetBackbone("resnet50", stem="torchvision")
    state = dict(source.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = tmp_path / "resnet50-torchvision.pth"
    torch.save(state, path)
    loaded = create_backbone("resnet50", weights=path)
    assert loaded.stem_type == "torchvision"
    x = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        expected, actual = source(x), loaded(x)
    for level in expected:
        assert torch.equal(expected[level], actual[level])


@pytest.mark.parametrize("wrapper", ["raw", "state_dict", "model"])
def test_resnet_loads_deep_stem_files_with_module_prefix(tmp_path, wrapper):
    state = layout_state("resnet50", "deep")
    prefixed = {f"module.{k}": v for k, v in state.items()}
    obj = prefixed if wrapper == "raw" else {wrapper: prefixed, "epoch": 3}
    path = tmp_path / "resnet50_v2.pth"
    torch.save(obj, path)
    backbone = create_backbone("resnet50", weights=path)  # stem detected from the keys
    assert backbone.stem_type == "deep" and backbone.feature_info["stem"].channels == 128
    assert_loaded_from(backbone, state)


def test_resnet_without_bn_step_counters_loads(tmp_path):
    state = layout_state("resnet50", "torchvision")
    state = {k: v for k, v in state.items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pth")
    create_backbone("resnet50", weights=tmp_path / "old.pth")


def test_resnet101_file_into_resnet50_names_the_file(tmp_path):
    path = tmp_path / "resnet101_v2.pth"
    torch.save(layout_state("resnet101", "deep"), path)
    with pytest.raises(CheckpointError) as info:
        create_backbone("resnet50", weights=path)
    message = str(info.value)
    assert str(path) in message and "resnet50" in message
    assert "unexpected key" in message and "layer3.6." in message
    assert "resnet101" in message  # the hint says what the file looks like


def test_explicit_stem_that_does_not_fit_the_file(tmp_path):
    path = tmp_path / "deep.pth"
    torch.save(layout_state("resnet50", "deep", with_fc=False), path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        create_backbone("resnet50", weights=path, stem="torchvision")


def test_file_of_another_architecture_names_the_file():
    lite_file = lite_imagenet_weight_path("efficientnet_lite0")
    with pytest.raises(CheckpointError) as info:
        create_backbone("resnet50", weights=lite_file)
    assert str(lite_file) in str(info.value) and "not a ResNet" in str(info.value)


def test_resnet_file_into_lite_and_unreadable_files(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(layout_state("resnet50", "torchvision"), path)
    with pytest.raises(CheckpointError, match="does not fit efficientnet_lite0"):
        create_backbone("efficientnet_lite0", weights=path)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.txt"):
        create_backbone("resnet50", weights=text)
    with pytest.raises(CheckpointError, match="not found"):
        create_backbone("resnet50", weights=tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="no ImageNet weights"):
        create_backbone("resnet50", weights="imagenet")


# --- EfficientNet-Lite with the real ImageNet weights -------------------------------------------------------
def test_lite0_imagenet_weights_classify_a_cat(lite0):
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(skimage_data.chelsea().copy()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        logits = lite0.classify(image)  # the package's own classifier, through our normalisation
    top = int(logits.argmax(1))
    assert 281 <= top <= 285, f"ImageNet class {top} is not a cat"


def test_dilated_lite_equals_the_strided_network_at_odd_positions(lite0):
    """Dilation with the dynamic 'same' padding is exact: the dilated stride-16 map, sampled at the centres
    of the stride-32 windows (odd positions for even-sized maps), equals the undilated network's output."""
    strided = create_backbone("efficientnet_lite0", weights="imagenet", dilate=False)
    x = torch.rand(1, 3, 64, 96)
    levels = ["stage6", "stage7", "head"]
    with torch.no_grad():
        dilated, plain = lite0(x, levels), strided(x, levels)
    for level in levels:
        assert dilated[level].shape[-2:] == (4, 6) and plain[level].shape[-2:] == (2, 3)
        assert torch.allclose(dilated[level][..., 1::2, 1::2], plain[level], atol=1e-4, rtol=1e-4)
    assert lite0.default_levels["mid"] == ["stage5", "stage6", "stage7"]
