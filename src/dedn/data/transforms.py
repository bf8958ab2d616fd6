"""Paired image/label transforms for few-shot segmentation.

Two transforms and one inverse, all implemented with torch ops (no OpenCV, no torchvision):

* :class:`TestTransform` - the PFENet/BAM evaluation resolution: resize the longer side to ``size``
  keeping the aspect ratio, pad bottom/right to ``size x size`` (image with :data:`PAD_RGB`, label with 255).
* :func:`restore_logits` - the inverse used for scoring at the original label size: crop the padding and
  bilinearly upsample the logits to ``(H, W)``.
* :class:`TrainTransform` - the PFENet/BAM training augmentation (RandScale, RandRotate, GaussianBlur,
  HFlip, Crop with padding), preceded by a resize of the longer side to ``size``.

Images go in as ``(H, W, 3) uint8`` RGB numpy arrays and come out as ``(3, S, S) float32`` tensors in
``[0, 1]`` (backbones normalise themselves); labels go in as ``(H, W) uint8`` and come out as ``(S, S)
int64``, with 255 wherever a pixel has no label (padding, outside a rotated image).

Coordinates follow the pixel-centre convention throughout (``align_corners=False`` and
``nearest-exact``): pixel ``j`` covers ``[j, j + 1)`` and its centre is at ``j + 0.5``. Using it for the
bilinear image warp and the nearest-neighbour label warp alike is what keeps image and label aligned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dedn.data.base import IGNORE_INDEX
from dedn.errors import ConfigError, DataError

#: Fill colour (RGB in [0, 1]) for image padding: the ImageNet mean, so that padding is zero after the
#: backbone's normalisation. PFENet and BAM pad their training crops with the mean too, but their test
#: resize pads with 0 (black); here training and test share the mean (TestTransform's ``fill``).
PAD_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)

# PFENet/BAM's RandomGaussianBlur calls cv2.GaussianBlur with a 5x5 kernel and sigma 0, for which OpenCV
# uses sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8 = 1.1.
_BLUR_KSIZE = 5
_BLUR_SIGMA = 0.3 * ((_BLUR_KSIZE - 1) * 0.5 - 1) + 0.8

__all__ = ["PAD_RGB", "TestTransform", "TrainTransform", "restore_logits", "scaled_size"]


# ----------------------------------------------------------------------------------------------- helpers
def _as_image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) uint8 tensor; greyscale and RGBA are accepted and converted."""
    if not isinstance(image, np.ndarray):
        raise DataError(f"image must be a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise DataError(f"image must have dtype uint8 (RGB 0..255), got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]  # drop alpha: backbones take RGB
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise DataError(f"image must have shape (H, W, 3) with H, W > 0, got {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)


def _as_label_tensor(label: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """(H, W) integer label -> (1, 1, H, W) uint8 tensor, checked against the image size."""
    if not isinstance(label, np.ndarray):
        raise DataError(f"label must be a numpy array (H, W) uint8, got {type(label).__name__}")
    if label.ndim != 2 or label.size == 0:
        raise DataError(f"label must have shape (H, W) with H, W > 0, got {label.shape}")
    if tuple(label.shape) != tuple(hw):
        raise DataError(
            f"label is {label.shape[1]}x{label.shape[0]} (WxH) but the image is {hw[1]}x{hw[0]}; "
            "image and label must have the same size"
        )
    if label.dtype != np.uint8:
        if not np.issubdtype(label.dtype, np.integer) or label.min() < 0 or label.max() > 255:
            raise DataError(f"label must be uint8 (values 0..255), got dtype {label.dtype}")
        label = label.astype(np.uint8)
    if not label.flags.writeable:  # e.g. a view of a decoded PIL image; torch wants its own memory
        label = label.copy()
    return torch.from_numpy(np.ascontiguousarray(label))[None, None]


def scaled_size(hw: Sequence[int], size: int) -> tuple[int, int]:
    """Size ``(h, w)`` of an ``(H, W)`` image whose longer side is resized to ``size``, aspect kept."""
    height, width = int(hw[0]), int(hw[1])
    scale = size / max(height, width)
    return max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))


def _resize_label(label: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (1, 1, H, W) label, sampling at pixel centres like the image."""
    if tuple(label.shape[-2:]) == tuple(hw):
        return label
    return F.interpolate(label, size=hw, mode="nearest-exact")


def _resize_pair(
    image: torch.Tensor, label: torch.Tensor | None, hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize a (1,3,H,W) uint8 image (bilinear, antialiased) and a (1,1,H,W) uint8 label (nearest)."""
    if tuple(image.shape[-2:]) != tuple(hw):
        # uint8 antialiased bilinear has a fast CPU kernel (about 0.5 ms for 500x375 -> 417 px, several
        # times faster than the float path)
        image = F.interpolate(image, size=hw, mode="bilinear", align_corners=False, antialias=True)
    if label is not None:
        label = _resize_label(label, hw)
    return image, label


def _to_float(image: torch.Tensor) -> torch.Tensor:
    return image.to(torch.float32).div_(255.0)


def _pad_tensor(dtype: torch.dtype = torch.float32, fill: Sequence[float] = PAD_RGB) -> torch.Tensor:
    return torch.tensor(tuple(fill), dtype=dtype).view(1, 3, 1, 1)


def _hw_pair(value: object, name: str) -> tuple[int, int]:
    """Turn ``(h, w)`` given as ints, a tensor, or a collated batch of identical sizes into two ints."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.ndim == 2:  # (B, 2) stacked sizes
            rows = {tuple(int(v) for v in row) for row in value.tolist()}
            if len(rows) != 1:
                raise DataError(f"{name}: the batch holds different sizes {sorted(rows)}; restore per sample")
            return next(iter(rows))  # type: ignore[return-value]
        value = value.reshape(-1).tolist()
    if not isinstance(value, Sequence) or len(value) != 2:
        raise DataError(f"{name} must be a pair (h, w), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, torch.Tensor):  # default_collate turns a tuple of ints into two (B,) tensors
            uniq = torch.unique(v.detach().cpu().reshape(-1)).tolist()
            if len(uniq) != 1:
                raise DataError(f"{name}: the batch holds different sizes {uniq}; restore per sample")
            v = uniq[0]
        out.append(int(v))
    if out[0] <= 0 or out[1] <= 0:
        raise DataError(f"{name} must be positive, got {tuple(out)}")
    return out[0], out[1]


# ------------------------------------------------------------------------------------------- evaluation
class TestTransform:
    """Resize the longer side to ``size`` (aspect kept) and pad bottom/right to ``size x size``.

    This is the PFENet/BAM evaluation resolution (473 for PASCAL, 641 for COCO in those papers). The image
    is resized bilinearly with antialiasing and padded with :data:`PAD_RGB`; the label is resized with
    nearest-neighbour sampling and padded with 255, so padding never counts in a loss or a metric.
    :func:`restore_logits` inverts it for scoring at the original label size.

    ``__call__(image, label=None)`` returns ``(image (3, S, S) float32 in [0, 1] or None, label (S, S) int64
    or None, scaled_hw)`` where ``scaled_hw = (h, w)`` is the size of the image content inside the padded
    square (needed by :func:`restore_logits`). Either input may be ``None``: an image alone (prediction on
    a user's picture) or a label alone (a support mask whose image features are cached); the two go
    through the same geometry, so separate calls stay aligned.

    ``fill``: the padding's RGB in [0, 1]. The project pads with the ImageNet mean everywhere (training
    and test), so that padding is 0 after normalisation. PFENet's and BAM's test code pads the resized
    image with 0 (black) instead, the mean being used only by their training crops; ``fill=(0, 0, 0)``
    reproduces that (``scripts/pad_fill.py`` compares the two on trained models).
    """

    __test__ = False  # the name starts with "Test": keep pytest from collecting it

    def __init__(self, size: int, fill: Sequence[float] = PAD_RGB):
        if not isinstance(size, int) or size <= 0:
            raise ConfigError(f"TestTransform size must be a positive integer, got {size!r}")
        fill = tuple(float(v) for v in fill)
        if len(fill) != 3 or not all(0.0 <= v <= 1.0 for v in fill):
            raise ConfigError(f"TestTransform fill must be 3 values in [0, 1], got {fill!r}")
        self.size = size
        self.fill = fill

    def scaled_hw(self, hw: Sequence[int]) -> tuple[int, int]:
        """Size ``(h, w)`` of the content for an ``(H, W)`` input (what ``__call__`` returns third)."""
        return scaled_size(hw, self.size)

    def __call__(
        self, image: np.ndarray | None, label: np.ndarray | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[int, int]]:
        if image is None and label is None:
            raise DataError("TestTransform needs an image, a label or both; got neither")
        img = _as_image_tensor(image) if image is not None else None
        if img is not None:
            hw = (int(img.shape[-2]), int(img.shape[-1]))
            lab = _as_label_tensor(label, hw) if label is not None else None
        else:
            hw = tuple(label.shape[:2]) if isinstance(label, np.ndarray) else (0, 0)
            lab = _as_label_tensor(label, hw)
        h, w = scaled_size(hw, self.size)
        size = self.size

        out_img = None
        if img is not None:
            img, _ = _resize_pair(img, None, (h, w))
            out_img = _pad_tensor(fill=self.fill).expand(1, 3, size, size).clone()[0]
            out_img[:, :h, :w] = _to_float(img[0])
        out_lab = None
        if lab is not None:
            lab = _resize_label(lab, (h, w))
            out_lab = torch.full((size, size), IGNORE_INDEX, dtype=torch.int64)
            out_lab[:h, :w] = lab[0, 0].to(torch.int64)
        return out_img, out_lab, (h, w)

    def __repr__(self) -> str:
        return f"TestTransform(size={self.size})"


def restore_logits(logits: torch.Tensor, scaled_hw: object, orig_hw: object) -> torch.Tensor:
    """Undo :class:`TestTransform` on network outputs: crop the padding, upsample to the original size.

    Args:
        logits: ``(B, C, S, S)`` float tensor (any device) predicted on the padded square.
        scaled_hw: ``(h, w)`` returned by :class:`TestTransform` (ints, a tensor, or a collated batch in
            which every sample has the same size).
        orig_hw: ``(H, W)`` of the original label.

    Returns:
        ``(B, C, H, W)`` logits, bilinearly resampled (``align_corners=False``, matching the forward
        resize), ready to be scored against the original label.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise DataError(f"logits must be a (B, C, S, S) tensor, got {shape}")
    h, w = _hw_pair(scaled_hw, "scaled_hw")
    H, W = _hw_pair(orig_hw, "orig_hw")
    if h > logits.shape[-2] or w > logits.shape[-1]:
        raise DataError(
            f"scaled_hw {(h, w)} is larger than the logits' spatial size {tuple(logits.shape[-2:])}"
        )
    cropped = logits[:, :, :h, :w]
    if (h, w) == (H, W):
        return cropped
    return F.interpolate(cropped, size=(H, W), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------- training
def _gaussian_blur(image: torch.Tensor) -> torch.Tensor:
    """5x5 Gaussian blur (sigma 1.1, as cv2.GaussianBlur(k=5, sigma=0)) of a (1, C, H, W) float image."""
    radius = _BLUR_KSIZE // 2
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-(taps**2) / (2 * _BLUR_SIGMA**2))
    weights = (weights / weights.sum()).tolist()
    # separable, as sums of shifted slices: on CPU this is about 20x faster than a depthwise conv2d.
    # Replicate padding (OpenCV reflects; the two differ only in the outermost pixels).
    for dim in (-1, -2):
        length = image.shape[dim]
        pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
        padded = F.pad(image, pad, mode="replicate")
        out = padded.narrow(dim, 0, length) * weights[0]
        for k in range(1, len(weights)):
            out.add_(padded.narrow(dim, k, length), alpha=weights[k])
        image = out
    return image


class TrainTransform:
    """PFENet/BAM training augmentation, made resolution-independent.

    The recipe, in order (random draws always happen in this order, so the output is a pure function of
    the inputs and the state of ``rng``):

    1. **Resize** the longer side to ``size`` (aspect kept). PFENet/BAM scale the original image directly,
       which works because VOC images (about 500 px) are close to their 473 crop; resizing first makes
       the crop cover most of the scene at any resolution (160 px synthetic images, 640 px COCO).
    2. **RandScale**: scale by ``s ~ U(scale[0], scale[1])`` (both sides alike). Steps 1 and 2 are one
       antialiased bilinear resize of the image and one nearest resize of the label.
    3. **RandRotate**: rotate by ``a ~ U(-rotate, rotate)`` degrees about the image centre on a canvas of
       the same size; corners that leave the canvas are cut, uncovered areas become padding.
    4. **GaussianBlur** with probability ``blur`` (5x5 kernel, sigma 1.1, as ``cv2.GaussianBlur(k=5)``).
    5. **HFlip** with probability ``flip``.
    6. **Crop** a ``size x size`` window at a uniformly random offset; a side shorter than ``size`` is
       padded equally on both sides first (PFENet's ``Crop(crop_type="rand")``).

    Padding is :data:`PAD_RGB` for the image and 255 for the label. Steps 3, 5 and 6 are a single affine
    map from output pixels to resized-image pixels, applied with ``grid_sample`` (bilinear for the image,
    nearest for the label) in the same pixel-centre convention, so image and label stay aligned. The blur
    is applied to the output window, which equals blurring before the flip and crop except within two
    pixels of the padding.

    ``__call__(image (H, W, 3) uint8, label (H, W) uint8, rng) -> (image (3, S, S) float32 in [0, 1],
    label (S, S) int64)``.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.9, 1.1),
        rotate: float = 10.0,
        blur: float = 0.5,
        flip: float = 0.5,
    ):
        if not isinstance(size, int) or size <= 0:
            raise ConfigError(f"TrainTransform size must be a positive integer, got {size!r}")
        if len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]):
            raise ConfigError(f"TrainTransform scale must be (min, max) with 0 < min <= max, got {scale!r}")
        if not 0 <= float(rotate) <= 180:
            raise ConfigError(f"TrainTransform rotate must be in [0, 180] degrees, got {rotate!r}")
        for name, p in (("blur", blur), ("flip", flip)):
            if not 0 <= float(p) <= 1:
                raise ConfigError(f"TrainTransform {name} must be a probability in [0, 1], got {p!r}")
        self.size = size
        self.scale = (float(scale[0]), float(scale[1]))
        self.rotate = float(rotate)
        self.blur = float(blur)
        self.flip = float(flip)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img = _as_image_tensor(image)
        hw = (int(img.shape[-2]), int(img.shape[-1]))
        lab = _as_label_tensor(label, hw)
        size = self.size

        # all random draws first, in a fixed order
        s = rng.uniform(self.scale[0], self.scale[1])
        angle = rng.uniform(-self.rotate, self.rotate) if self.rotate > 0 else 0.0
        do_blur = rng.random() < self.blur
        do_flip = rng.random() < self.flip
        u_y, u_x = rng.random(), rng.random()

        # 1 + 2: one resize to the final scale (antialiased for the image when it shrinks)
        base = size / max(hw)
        h = max(1, round(hw[0] * base * s))
        w = max(1, round(hw[1] * base * s))
        img, lab = _resize_pair(img, lab, (h, w))

        # 6: crop offsets in canvas coordinates (negative = centred padding)
        oy = int(u_y * (h - size + 1)) if h >= size else -((size - h) // 2)
        ox = int(u_x * (w - size + 1)) if w >= size else -((size - w) // 2)

        identity = angle == 0.0 and not do_flip
        if identity and oy >= 0 and ox >= 0:
            # pure crop: slicing is exact and skips the resampling
            out_img = _to_float(img[:, :, oy : oy + size, ox : ox + size])
            out_lab = lab[0, 0, oy : oy + size, ox : ox + size].to(torch.int64)
        else:
            out_img, out_lab = self._warp(img, lab, (h, w), angle, do_flip, oy, ox)
        if do_blur:
            out_img = _gaussian_blur(out_img)
        return out_img[0].clamp_(0.0, 1.0), out_lab

    def _warp(
        self,
        img: torch.Tensor,
        lab: torch.Tensor,
        hw: tuple[int, int],
        angle: float,
        flip: bool,
        oy: int,
        ox: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate about the centre, flip and crop/pad, as one inverse map from output to input pixels."""
        h, w = hw
        size = self.size
        # output pixel centres, in canvas coordinates (continuous, pixel j spans [j, j+1))
        coords = torch.arange(size, dtype=torch.float32) + 0.5
        yc = (coords + oy).view(-1, 1).expand(size, size)
        xc = (coords + ox).view(1, -1).expand(size, size)
        if flip:  # the flip acts on the rotated canvas of width w
            xc = w - xc
        # inverse rotation about the canvas centre (the canvas has the resized image's size)
        cy, cx = h / 2.0, w / 2.0
        rad = math.radians(angle)
        cos, sin = math.cos(rad), math.sin(rad)
        dx, dy = xc - cx, yc - cy
        xs = cos * dx - sin * dy + cx
        ys = sin * dx + cos * dy + cy
        # to grid_sample's normalised coordinates (align_corners=False: -1 and 1 are the outer edges)
        grid = torch.stack((xs * (2.0 / w) - 1.0, ys * (2.0 / h) - 1.0), dim=-1).unsqueeze(0)

        pad = _pad_tensor()
        # sample (image - pad) with zero padding, then add pad back: outside the image is exactly PAD_RGB
        out_img = (
            F.grid_sample(
                _to_float(img) - pad, grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
            + pad
        )
        # shift labels by one so that zero padding marks "outside the image"
        lab_f = lab.to(torch.float32) + 1.0
        out = F.grid_sample(lab_f, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
        out_lab = out.to(torch.int64) - 1
        out_lab[out_lab < 0] = IGNORE_INDEX
        return out_img, out_lab

    def __repr__(self) -> str:
        return (
            f"TrainTransform(size={self.size}, scale={self.scale}, rotate={self.rotate}, "
            f"blur={self.blur}, flip={self.flip})"
        )
