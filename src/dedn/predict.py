"""Run a trained model on your own pictures.

:class:`Predictor` wraps a :class:`~dedn.models.network.FewShotSegmenter` with everything needed between
files on disk and the network: decoding (paths, PIL images, NumPy arrays, torch tensors), EXIF orientation,
grayscale / RGBA / 16-bit images, masks in the usual encodings, the evaluation resize-and-pad
(:class:`~dedn.data.transforms.TestTransform`) and its inverse, so that a prediction comes back at the
query's original size::

    predictor = Predictor.from_pretrained()  # the shipped model; or .from_checkpoint("runs/.../best.pt")
    result = predictor.predict("query.jpg", "support.jpg", "support_mask.png")
    result.mask          # (H, W) uint8, 1 = the support's object
    result.probability   # (H, W) float32 foreground probability

Supports can be encoded once with :meth:`Predictor.encode_supports` and reused for many queries (the
backbone is frozen, so their features never change); :func:`predict_files` does that for a folder and is
what ``dedn predict`` runs.

Masks (``support_masks``) are read as follows; ``mask_value`` overrides the guess:

* binary masks stored as 0/255, 0/1, 0/65535 (16-bit), booleans, or floats in [0, 1] (>= 0.5 is object);
* a label map with exactly one object value, optionally with 255 as "ignore" (the PASCAL VOC border);
* grayscale masks with soft edges (resized or JPEG-compressed): thresholded at half the value range;
* palette PNGs give their palette indices; with several classes in one mask, pass ``mask_value`` (the
  class index) - the other classes become background and 255 stays "ignore";
* colour masks (RGB/RGBA, e.g. drawn in an editor): the object is wherever a pixel is not black (after
  transparency); several distinct colours need a grayscale or palette mask instead.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from dedn.data.base import IGNORE_INDEX
from dedn.data.transforms import PAD_RGB, TestTransform, restore_logits
from dedn.engine.distributed import resolve_device
from dedn.errors import CheckpointError, ConfigError, DataError
from dedn.models.ops import label_map
from dedn.utils.io import make_dir
from dedn.weak import Box, box_mask, box_support, check_box, equal_scores

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderSummary",
    "LabelPrediction",
    "LoadedImage",
    "Prediction",
    "Predictor",
    "SupportSet",
    "binarize_mask",
    "find_images",
    "load_image",
    "load_mask",
    "output_names",
    "predict_files",
]

#: What counts as an image when a folder of queries is given (compared in lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
# PIL raises these for missing, truncated or undecodable files (SyntaxError for some broken headers)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_EXIF_ORIENTATION = 0x0112
_SHAPES = "expected (H, W), (H, W, 3), (H, W, 4) or (3, H, W)"


# ------------------------------------------------------------------------------------------------ decoding
@dataclass
class LoadedImage:
    """A decoded picture: ``pixels`` is (H, W, 3) uint8 RGB for images, (H, W) for raw mask values."""

    pixels: np.ndarray
    name: str
    #: (H, W) as stored in the file, before the EXIF orientation was applied
    stored_hw: tuple[int, int] | None = None
    #: the EXIF orientation tag (1 = upright; 5..8 swap width and height)
    orientation: int = 1
    #: for masks: True when the values are palette indices (a class map, never a soft mask)
    palette: bool = False


def _describe(obj: Any, default: str) -> str:
    if isinstance(obj, str | os.PathLike):
        return str(obj)
    name = getattr(obj, "filename", "")  # PIL images opened from a file remember it
    return str(name) if name else default


def _open_pil(path: str | os.PathLike, what: str, label: str | None = None) -> Image.Image:
    path = Path(path)
    shown = label or str(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so that a truncated file fails here, with its name
            return im.copy()  # the copy keeps the palette and the EXIF block; the file is closed after
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {shown}") from None
    except IsADirectoryError:
        raise DataError(f"{what} {shown} is a folder, expected an image file") from None
    except _DECODE_ERRORS as e:
        reason = str(e).replace(str(path), "").replace("''", "").strip(" :") or type(e).__name__
        raise DataError(f"cannot decode {what} {shown} ({reason}); expected a readable image file") from None


def _orient(im: Image.Image, name: str) -> tuple[Image.Image, tuple[int, int], int]:
    """Apply the EXIF orientation (phone photos store pixels sideways and a tag saying how to turn them)."""
    stored = (im.height, im.width)
    try:
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth rejecting a picture for
        return im, stored, 1
    if orientation == 1:
        return im, stored, 1
    try:
        turned = ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - Pillow raises various errors for malformed EXIF data
        raise DataError(f"{name}: cannot apply its EXIF orientation ({e})") from None
    return (turned if turned is not None else im), stored, orientation


def _scale_to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    """Integer or float pixel values -> uint8 0..255 (16-bit divided by 257, floats in [0, 1] times 255)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.size == 0:
        raise DataError(f"{name} is empty (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError(f"{name} contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0:
            raise DataError(f"{name} has negative values (min {lo:g}); expected [0, 1] or [0, 255]")
        if hi <= 1.0:
            return np.round(arr * 255.0).astype(np.uint8)
        if hi <= 255.0:
            return np.round(arr).astype(np.uint8)
        raise DataError(f"{name} has float values up to {hi:g}; expected [0, 1] or [0, 255]")
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise DataError(f"{name} has negative values (min {lo})")
        if arr.dtype.itemsize == 1 or hi <= 255 and arr.dtype != np.uint16:
            return arr.astype(np.uint8)
        if hi <= 65535:
            # 16-bit: the full range maps to 0..255 (x / 257 is exact for 0 and 65535)
            return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
        raise DataError(f"{name} has values up to {hi}; expected 8- or 16-bit pixel values")
    raise DataError(f"{name} has dtype {arr.dtype}; expected an integer or float image")


def _channels_last(arr: np.ndarray, prefer_channels_first: bool, name: str) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4 -> (H, W) or (H, W, C)."""
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]  # a batch of one
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3:
        first, last = arr.shape[0] in (1, 3, 4), arr.shape[2] in (1, 3, 4)
        if first and (prefer_channels_first or not last):
            arr = np.moveaxis(arr, 0, 2)
        elif not last:
            raise DataError(f"{name} has shape {arr.shape}; {_SHAPES}")
        return arr[:, :, 0] if arr.shape[2] == 1 else arr
    raise DataError(f"{name} has shape {arr.shape}; {_SHAPES}")


def _composite(rgb: np.ndarray, alpha: np.ndarray, background: Sequence[float]) -> np.ndarray:
    """Alpha-blend (H, W, 3) uint8 over a constant background colour (RGB in [0, 1])."""
    a = alpha.astype(np.float32)[:, :, None] / 255.0
    bg = np.asarray(background, dtype=np.float32) * 255.0
    return np.round(rgb.astype(np.float32) * a + bg * (1.0 - a)).astype(np.uint8)


def _array_to_rgb(arr: np.ndarray, name: str, channels_first: bool) -> np.ndarray:
    arr = _channels_last(np.asarray(arr), channels_first, name)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{name} is empty (shape {arr.shape})")
    arr = _scale_to_uint8(arr, name)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 4:
        # Transparent pixels hold arbitrary colours; blending over the padding colour (the ImageNet mean,
        # zero after the backbone's normalisation) makes them carry no information.
        return _composite(arr[:, :, :3], arr[:, :, 3], PAD_RGB)
    # a read-only array (np.asarray of a PIL image) cannot back a torch tensor: copy it then
    return np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()


def _pil_to_rgb(im: Image.Image, name: str) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and 32-bit grayscale: Pillow's convert("RGB") would clip everything above 255 to white
        arr = np.asarray(im)
        if mode.startswith("I;16"):
            arr = arr.astype(np.uint16)
        elif mode == "I" and arr.size and int(arr.max()) > 255:
            arr = np.clip(arr, 0, 65535).astype(np.uint16)
        return _array_to_rgb(arr, name, channels_first=False)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        return _composite(rgba[:, :, :3], rgba[:, :, 3], PAD_RGB)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def load_image(image: ImageInput, name: str | None = None) -> LoadedImage:
    """Decode an image given as a path, a PIL image, a NumPy array or a torch tensor.

    Returns (H, W, 3) uint8 RGB pixels in the displayed orientation (EXIF applied for files and PIL
    images). Arrays may be (H, W) gray, (H, W, 3) RGB, (H, W, 4) RGBA (blended over the padding colour) or
    channels-first (3, H, W) (the default for torch tensors); uint8, uint16 (16-bit) or float in [0, 1]
    or [0, 255]. Raises :class:`DataError` naming the file for anything unreadable.
    """
    label = name or _describe(image, "image")
    if isinstance(image, str | os.PathLike):
        image = _open_pil(image, "image", label)
    if isinstance(image, Image.Image):
        im, stored, orientation = _orient(image, label)
        return LoadedImage(_pil_to_rgb(im, label), label, stored, orientation)
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.dtype == torch.bfloat16 or arr.dtype == torch.float16:
            arr = arr.float()
        return LoadedImage(_array_to_rgb(arr.numpy(), label, channels_first=True), label)
    if isinstance(image, np.ndarray):
        return LoadedImage(_array_to_rgb(image, label, channels_first=False), label)
    raise DataError(
        f"{label}: unsupported image type {type(image).__name__}; expected a path, a PIL image, a NumPy "
        "array or a torch tensor"
    )


def _pil_mask_values(im: Image.Image, name: str) -> tuple[np.ndarray, bool]:
    """Raw mask values of a PIL image -> ((H, W) array, is_palette)."""
    mode = im.mode
    if mode == "P":
        return np.asarray(im), True  # palette indices are class ids (the VOC convention)
    if mode == "1":
        return np.asarray(im, dtype=bool), False
    if mode in ("L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im)
        return (arr.astype(np.uint16) if mode.startswith("I;16") else arr), False
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
    return _colour_mask_values(rgba, name), False


def _colour_mask_values(arr: np.ndarray, name: str) -> np.ndarray:
    """(H, W, 3|4) colour mask -> (H, W) uint8: the brightest channel after transparency (over black)."""
    rgb = arr[:, :, :3].astype(np.float32)
    if arr.shape[2] == 4:
        rgb = rgb * (arr[:, :, 3:4].astype(np.float32) / 255.0)
    rgb = np.round(rgb).astype(np.uint8)
    if not (rgb[:, :, 0] == rgb[:, :, 1]).all() or not (rgb[:, :, 1] == rgb[:, :, 2]).all():
        colours = np.unique(rgb.reshape(-1, 3), axis=0)
        non_black = [tuple(int(v) for v in c) for c in colours if c.any()]
        # A handful of distinct flat colours is a class-colour map (several objects); many colours are the
        # soft edges of one stroke.
        if 1 < len(non_black) <= 16:
            raise DataError(
                f"mask {name} has {len(non_black)} colours {non_black[:6]}; expected one colour on black, or "
                "a grayscale / palette mask (then pick the object with mask_value / --mask-value)"
            )
    return rgb.max(axis=2)


def load_mask(mask: ImageInput, name: str | None = None) -> LoadedImage:
    """Decode a mask as its raw (H, W) values (EXIF orientation applied; see :func:`binarize_mask`)."""
    label = name or _describe(mask, "mask")
    if isinstance(mask, str | os.PathLike):
        mask = _open_pil(mask, "mask", label)
    if isinstance(mask, Image.Image):
        im, stored, orientation = _orient(mask, label)
        values, palette = _pil_mask_values(im, label)
        return LoadedImage(values, label, stored, orientation, palette)
    if isinstance(mask, torch.Tensor):
        t = mask.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        arr, channels_first = t.numpy(), True
    elif isinstance(mask, np.ndarray):
        arr, channels_first = mask, False
    else:
        raise DataError(
            f"{label}: unsupported mask type {type(mask).__name__}; expected a path, a PIL image, a NumPy "
            "array or a torch tensor"
        )
    arr = _channels_last(np.asarray(arr), channels_first, label)
    if arr.ndim == 3:
        arr = _colour_mask_values(_scale_to_uint8(arr, label), label)
    if arr.size == 0:
        raise DataError(f"mask {label} is empty (shape {arr.shape})")
    return LoadedImage(arr, label)


def binarize_mask(
    values: np.ndarray, mask_value: int | None = None, name: str = "mask", palette: bool = False
) -> np.ndarray:
    """Raw mask values (H, W) -> uint8 {0 background, 1 object, 255 ignore} (rules in the module doc)."""
    if values.dtype == bool:
        return values.astype(np.uint8)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise DataError(f"mask {name} contains NaN or infinite values")
        if mask_value is None and float(values.max(initial=0.0)) <= 1.0:
            return (values >= 0.5).astype(np.uint8)
        values = np.round(values).astype(np.int64)
    if not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"mask {name} has dtype {values.dtype}; expected integer or float values")
    present = np.unique(values)
    if mask_value is not None:
        if not (present == mask_value).any():
            raise DataError(
                f"mask {name} has no pixel of value {mask_value}; its values are {_list(present)}"
            )
        out = np.zeros(values.shape, dtype=np.uint8)
        if mask_value != IGNORE_INDEX:
            out[values == IGNORE_INDEX] = IGNORE_INDEX
        out[values == mask_value] = 1
        return out
    nonzero = [int(v) for v in present if v != 0]
    if not nonzero:
        return np.zeros(values.shape, dtype=np.uint8)  # an empty mask: nothing to find
    if len(nonzero) == 1:
        return (values == nonzero[0]).astype(np.uint8)
    if len(nonzero) == 2 and IGNORE_INDEX in nonzero and (palette or nonzero[0] < 128):
        # one class with a 255 "ignore" border (PASCAL VOC); a gray pair like 128/255 is a soft mask instead
        out = (values == nonzero[0]).astype(np.uint8)
        out[values == IGNORE_INDEX] = IGNORE_INDEX
        return out
    if palette:
        raise DataError(
            f"mask {name} holds several classes {_list(present)} (palette indices); choose one with "
            "mask_value / --mask-value"
        )
    # Many gray levels: a binary mask whose edges were smoothed by resizing or JPEG compression.
    top = 65535 if values.dtype == np.uint16 or int(present[-1]) > 255 else 255
    out = (values > top // 2).astype(np.uint8)
    if not out.any():
        raise DataError(
            f"mask {name} has several values {_list(present)} and none in the upper half of the range; if "
            "it is a label map, choose the object with mask_value / --mask-value"
        )
    return out


def _list(values: np.ndarray, limit: int = 12) -> str:
    items = [int(v) for v in values[:limit]]
    more = f" ... ({len(values)} values)" if len(values) > limit else ""
    return f"{items}{more}"


def _distinct(values: np.ndarray, limit: int) -> int:
    """The number of distinct values (colours for (H, W, 3)) in ``values``, counted up to ``limit + 1``
    on a regular subsample of at most 64k pixels."""
    flat = values.reshape(-1, values.shape[2]) if values.ndim == 3 else values.reshape(-1, 1)
    step = max(1, len(flat) // 65536)
    return min(len(np.unique(flat[::step], axis=0)), limit + 1)


def _photo_like(values: np.ndarray) -> bool:
    """Mask values that look like a photo: many levels, and most pixels between the darkest and the
    brightest (a mask with soft edges has its levels on the edges only)."""
    if values.dtype == bool or _distinct(values, 32) <= 32:
        return False
    lo, hi = values.min(), values.max()
    return float(((values != lo) & (values != hi)).mean()) > 0.5


def _check_not_swapped(image: LoadedImage, mask: LoadedImage) -> None:
    """A support given as (mask, image) instead of (image, mask): the "image" has a handful of flat
    values, as a mask does, and the "mask" the levels of a photo. Either alone is legitimate (a flat
    drawing; a mask with soft edges), both together are not."""
    if _distinct(image.pixels, 8) <= 8 and _photo_like(mask.pixels):
        raise DataError(
            f"support image {image.name} looks like a mask (at most 8 colours) and its mask {mask.name} like "
            "a photo (many levels): give each support as IMAGE then MASK"
        )


def _check_pair(image: LoadedImage, mask: LoadedImage) -> None:
    ih, iw = image.pixels.shape[:2]
    mh, mw = mask.pixels.shape[:2]
    if (ih, iw) == (mh, mw):
        return
    hint = ""
    if image.stored_hw is not None and image.orientation != 1 and tuple(image.stored_hw) == (mh, mw):
        hint = (
            f"; the mask fits the image as stored, before its EXIF orientation ({image.orientation}) is "
            "applied: save the mask in the orientation the photo is displayed in"
        )
    raise DataError(
        f"mask {mask.name} is {mw}x{mh} (WxH) but its image {image.name} is {iw}x{ih}; a mask must have "
        f"the size of its image{hint}"
    )


# -------------------------------------------------------------------------------------------- prediction
@dataclass
class SupportSet:
    """Encoded supports, reusable for any number of queries (:meth:`Predictor.encode_supports`)."""

    #: backbone features with batch and shot dimensions: (1, K, C, h, w) per entry
    features: dict[str, torch.Tensor]
    #: (1, K, S, S) {0, 1, 255} masks in the network's padded square
    masks: torch.Tensor
    names: list[str]
    #: object pixels of each mask at its original size
    foreground_pixels: list[int]
    image_size: int
    #: what the model computes from the supports alone (AWF's support scores, the probe's fit), kept after
    #: the first query so that the next ones do not pay for it again
    cache: dict = field(default_factory=dict, repr=False)
    #: some support was given as a box: no mask to score AWF's members against, so the experts are averaged
    boxes: bool = False

    @property
    def shots(self) -> int:
        return int(self.masks.shape[1])

    @property
    def empty(self) -> bool:
        """No support has an object pixel: every prediction will be background."""
        return not any(self.foreground_pixels)


@dataclass
class Prediction:
    """One query's result at its original size (EXIF orientation applied)."""

    #: (H, W) uint8, 1 where the support's object is predicted
    mask: np.ndarray
    #: (H, W) float32 foreground probability (the fused one for DEDN)
    probability: np.ndarray
    #: (H, W, 3) uint8 RGB query as the model saw it (for overlays)
    image: np.ndarray
    name: str
    #: with ``return_experts``: each expert's (H, W) float32 foreground probability
    experts: dict[str, np.ndarray] | None = None
    #: with ``return_experts``: the episode's fusion weight of each expert (DEDN with AWF or mean fusion)
    fusion_weights: dict[str, float] | None = None
    empty_support: bool = False


@dataclass
class LabelPrediction:
    """Several classes found in one query (:meth:`Predictor.predict_classes`), at its original size."""

    #: (H, W) uint8: 0 background, k the k-th class of ``class_names``
    labels: np.ndarray
    class_names: list[str]
    #: (N, H, W) float32: each class's foreground probability, as if it had been asked for alone
    probabilities: np.ndarray
    #: (H, W, 3) uint8 RGB query
    image: np.ndarray
    name: str

    def mask(self, class_name: str) -> np.ndarray:
        """(H, W) uint8, 1 where ``class_name`` won the pixel."""
        if class_name not in self.class_names:
            raise KeyError(f"{class_name!r} is not one of the classes {self.class_names}")
        return (self.labels == self.class_names.index(class_name) + 1).astype(np.uint8)


def _as_list(x: Any) -> list:
    if isinstance(x, list | tuple):
        return list(x)
    if isinstance(x, np.ndarray | torch.Tensor) and x.ndim == 4 and x.shape[0] > 1:
        return list(x)  # a stack of K images
    return [x]


class Predictor:
    """A trained model ready for pictures: ``predict(query, supports, support_masks)``.

    ``image_size`` is the longer side of the network input (the checkpoint's ``data.image_size`` by
    default); the query is resized and padded to it, and the prediction is brought back to the query's
    size. The model is put in eval mode and moved to ``device``.
    """

    def __init__(self, model: torch.nn.Module, image_size: int, device: str | torch.device | None = None):
        self.device = (
            resolve_device(device)
            if device is not None
            else next((p.device for p in model.parameters()), torch.device("cpu"))
        )
        self.model = model.to(self.device).eval()
        self.image_size = int(image_size)
        self.transform = TestTransform(self.image_size)
        self.expert_names: list[str] = list(getattr(model, "expert_names", []))
        self.fusion_members: list[str] = list(getattr(model, "fusion_members", self.expert_names))
        self.config = None  # the full run config when loaded from a checkpoint
        self.pretrained: str | None = None  # the shipped model's name (from_pretrained)
        #: how a support given as a box becomes its mask (dedn.weak): probe | none
        self.box_refinement = "probe"

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        image_size: int | None = None,
        test_time: dict[str, Any] | None = None,
    ) -> Predictor:
        """Build the model described by the checkpoint's own config and load its weights. ``test_time``:
        test-time settings that replace the checkpoint's (``{"model.fusion.matcher": "probe"}``).

        Raises :class:`CheckpointError` for a missing, unreadable or mismatched file.
        """
        from dedn.engine.checkpoint import checkpoint_config, load_checkpoint, load_model_state
        from dedn.models.network import FewShotSegmenter

        state = load_checkpoint(path)
        cfg = checkpoint_config(state, path, test_time)
        try:
            model = FewShotSegmenter(cfg.model)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"{path}: cannot build the model it was trained with ({e})") from None
        if not model.trainable:
            raise CheckpointError(f"{path}: model.method = {cfg.model.method} is training-free; no weights")
        load_model_state(model, state["model"], path)
        size = image_size if image_size is not None else cfg.data.image_size
        if not isinstance(size, int) or size < 32:
            raise ConfigError(f"image size must be an integer of at least 32, got {size!r}")
        predictor = cls(model, size, resolve_device(device))
        predictor.config = cfg
        return predictor

    @classmethod
    def from_pretrained(
        cls, name: str | None = None, device: str | torch.device | None = None, image_size: int | None = None
    ) -> Predictor:
        """The model shipped inside the package (``dedn.pretrained``; default: the manifest's default),
        its file checked against the manifest's sha256, run with the test-time settings its manifest entry
        gives (``test_time``: the fusion chosen after it was trained)."""
        from dedn.pretrained import pretrained_models, pretrained_path

        path = pretrained_path(name)
        entry = pretrained_models()["models"][name or _default_pretrained_name()]
        predictor = cls.from_checkpoint(
            path, device=device, image_size=image_size, test_time=entry.get("test_time")
        )
        predictor.pretrained = name or _default_pretrained_name()
        return predictor

    @classmethod
    def training_free(cls, method: str, like: Predictor) -> Predictor:
        """The training-free ``proto`` or ``prior`` with ``like``'s backbone, input size and device: the
        matchers a user can compare a trained model with on their own pictures."""
        from dedn.models.network import TRAINING_FREE, FewShotSegmenter

        if method not in TRAINING_FREE:
            raise ConfigError(
                f"method {method!r} is not training-free; expected one of {', '.join(TRAINING_FREE)}"
            )
        if like.config is None:
            raise ConfigError("a training-free predictor needs a predictor loaded from a checkpoint to copy")
        cfg = copy.deepcopy(like.config)
        cfg.model.method = method
        predictor = cls(FewShotSegmenter(cfg.model, like.model.backbone), like.image_size, like.device)
        predictor.config = cfg
        return predictor

    # -------------------------------------------------------------------------------------- internals
    def _box_support(self, high: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """A box's (S, S) mask in the network's square -> the support mask (``box_refinement``)."""
        model = self.model
        return box_support(
            high.to(self.device),
            box.to(self.device),
            self.box_refinement,
            model.fit_box_probe,
            model._support_fractions,
        ).cpu()

    def _encode(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        tensor, _, _ = self.transform(image, None)
        feats = self.model.encode(tensor.unsqueeze(0).to(self.device))
        return {k: v[0] for k, v in feats.items()}

    def load_support(
        self, image: ImageInput, mask: ImageInput | Box, mask_value: int | None = None, index: int = 0
    ) -> tuple[LoadedImage, np.ndarray]:
        """Decode one support: (its image, its {0, 1, 255} mask), checked to be the same size. A
        :class:`~dedn.weak.Box` instead of a mask gives the box's mask (1 inside), checked to lie on the
        image; :meth:`encode_supports` then refines it (``box_refinement``)."""
        img = load_image(image, _describe(image, f"support {index + 1} image"))
        if isinstance(mask, Box):
            box = check_box(mask, img.pixels.shape[:2], f"support {index + 1} box ({img.name})")
            return img, box_mask(img.pixels.shape[:2], box)
        raw = load_mask(mask, _describe(mask, f"support {index + 1} mask"))
        _check_pair(img, raw)
        _check_not_swapped(img, raw)
        return img, binarize_mask(raw.pixels, mask_value, raw.name, raw.palette)

    def encode_supports(
        self,
        supports: ImageInput | Sequence[ImageInput],
        support_masks: ImageInput | Sequence[ImageInput],
        mask_value: int | None = None,
    ) -> SupportSet:
        """Decode, check and encode K supports and their masks (one item or lists of K). A mask may be a
        :class:`~dedn.weak.Box`: the box is made into the support's mask as ``self.box_refinement`` says
        (default ``probe``: the part of the box that the picture's frozen features separate from its
        outside is the object, the rest of the box "ignore"; ``none``: the whole box), and DEDN's two
        experts are then averaged: AWF would score its members against the box, which is not the
        object's mask (:func:`dedn.weak.equal_scores`)."""
        images, masks = _as_list(supports), _as_list(support_masks)
        if (
            len(images) > 1
            and len(masks) == 1
            and isinstance(masks[0], np.ndarray | torch.Tensor)
            and masks[0].ndim == 3
            and masks[0].shape[0] == len(images)
        ):
            masks = list(masks[0])  # a (K, H, W) stack of masks for a stack of K images
        if not images:
            raise DataError("at least one support image is needed")
        if len(images) != len(masks):
            raise DataError(f"got {len(images)} support images but {len(masks)} support masks")
        feats, tmasks, names, counts = [], [], [], []
        with torch.no_grad():
            for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
                img, binary = self.load_support(image, mask, mask_value, i)
                feats.append(self._encode(img.pixels))
                _, tmask, _ = self.transform(None, binary)
                if isinstance(mask, Box):
                    tmask = self._box_support(feats[-1]["high"], tmask)
                tmasks.append(tmask)
                names.append(img.name)
                counts.append(int((binary == 1).sum()))
        features = {k: torch.stack([f[k] for f in feats]).unsqueeze(0) for k in feats[0]}
        return SupportSet(
            features,
            torch.stack(tmasks).unsqueeze(0).to(self.device),
            names,
            counts,
            self.image_size,
            boxes=any(isinstance(m, Box) for m in masks),
        )

    # -------------------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict(
        self,
        query: ImageInput,
        supports: SupportSet | ImageInput | Sequence[ImageInput],
        support_masks: ImageInput | Sequence[ImageInput] | None = None,
        return_experts: bool = False,
        mask_value: int | None = None,
    ) -> Prediction:
        """Segment in ``query`` the object marked by ``support_masks`` on ``supports``.

        ``supports`` is one image, a list of K images, or a :class:`SupportSet` (then ``support_masks`` is
        None). Returns a :class:`Prediction` at the query's original size.
        """
        if isinstance(supports, SupportSet):
            if support_masks is not None:
                raise DataError("support_masks must be None when supports is an encoded SupportSet")
            support_set = supports
        else:
            if support_masks is None:
                raise DataError("support_masks are required with support images")
            support_set = self.encode_supports(supports, support_masks, mask_value)
        if support_set.image_size != self.image_size:
            raise DataError(
                f"the supports were encoded at size {support_set.image_size}, the predictor "
                f"runs at {self.image_size}"
            )
        q = load_image(query, _describe(query, "query"))
        return self.predict_loaded(q, support_set, return_experts)

    @torch.no_grad()
    def predict_loaded(
        self, q: LoadedImage, support_set: SupportSet, return_experts: bool = False
    ) -> Prediction:
        """:meth:`predict` for an already decoded query (:func:`load_image`) and encoded supports."""
        hw = q.pixels.shape[:2]
        qf = {k: v.unsqueeze(0) for k, v in self._encode(q.pixels).items()}
        out, probability, scaled = self._forward(qf, support_set, hw)
        result = Prediction(
            mask=(probability > 0.5).to(torch.uint8).cpu().numpy(),
            probability=probability.cpu().numpy().astype(np.float32),
            image=q.pixels,
            name=q.name,
            empty_support=bool(out["empty_support"][0]),
        )
        if return_experts:
            result.experts = {
                name: restore_logits(logits.float(), scaled, hw).softmax(dim=1)[0, 1].cpu().numpy()
                for name, logits in out.get("experts", {}).items()
            }
            if "fusion_weights" in out:
                weights = out["fusion_weights"][0].tolist()
                result.fusion_weights = dict(zip(self.fusion_members, weights, strict=True))
        return result

    @torch.no_grad()
    def predict_classes(
        self,
        query: ImageInput,
        support_sets: Mapping[str, SupportSet],
        threshold: float = 0.5,
    ) -> LabelPrediction:
        """Segment several classes at once: ``support_sets`` maps each class's name to its encoded
        supports (:meth:`encode_supports`). The query is encoded once; each class is found as on its own
        (one pass of the heads per class), and a pixel goes to the class of highest probability among
        those above ``threshold``, else to the background (0). Returns a :class:`LabelPrediction`."""
        q = load_image(query, _describe(query, "query"))
        return self.predict_classes_loaded(q, support_sets, threshold)

    @torch.no_grad()
    def predict_classes_loaded(
        self, q: LoadedImage, support_sets: Mapping[str, SupportSet], threshold: float = 0.5
    ) -> LabelPrediction:
        """:meth:`predict_classes` for an already decoded query."""
        if not support_sets:
            raise DataError("no class given: support_sets is empty")
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold {threshold}: expected a probability strictly between 0 and 1")
        for name, support_set in support_sets.items():
            if not isinstance(support_set, SupportSet):
                raise DataError(
                    f"class {name!r}: expected a SupportSet (Predictor.encode_supports), got "
                    f"{type(support_set).__name__}"
                )
            if support_set.empty:
                raise DataError(f"class {name!r}: its support masks mark no object pixel")
            if support_set.image_size != self.image_size:
                raise DataError(
                    f"class {name!r}: its supports were encoded at size {support_set.image_size}, the "
                    f"predictor runs at {self.image_size}"
                )
        hw = q.pixels.shape[:2]
        qf = {k: v.unsqueeze(0) for k, v in self._encode(q.pixels).items()}
        probabilities = torch.stack([self._forward(qf, s, hw)[1] for s in support_sets.values()])
        labels = label_map(probabilities, threshold)
        return LabelPrediction(
            labels=labels.to(torch.uint8).cpu().numpy(),
            class_names=list(support_sets),
            probabilities=probabilities.cpu().numpy().astype(np.float32),
            image=q.pixels,
            name=q.name,
        )

    def _forward(
        self, qf: dict[str, torch.Tensor], support_set: SupportSet, hw: tuple[int, int]
    ) -> tuple[dict, torch.Tensor, tuple[int, int]]:
        """One pass of the heads for an encoded query: (the model's outputs, the (H, W) foreground
        probability at the query's size, the query's scaled size in the network's square)."""
        size = (self.image_size, self.image_size)
        # per model: a support set may be shared by predictors of different models
        cache = support_set.cache.setdefault(id(self.model), {})
        if support_set.boxes and "support_scores" not in cache:
            cache["support_scores"] = equal_scores(self.model, self.device)
        out = self.model.forward_features(
            qf,
            support_set.features,
            support_set.masks,
            size,
            support_scores=cache.get("support_scores"),
            probe=cache.get("probe"),
        )
        cache.update({key: out[key] for key in ("support_scores", "probe") if key in out})
        scaled = self.transform.scaled_hw(hw)
        # The logits are restored exactly as in evaluation, so the mask equals what `dedn eval` scores.
        probability = restore_logits(out["logits"].float(), scaled, hw).softmax(dim=1)[0, 1]
        return out, probability, scaled


# ------------------------------------------------------------------------------------------ folders/files
def _looks_like_mask(path: Path) -> bool:
    """A picture file of at most 8 distinct values (read from a thumbnail), as masks are; False for a file
    that cannot be read (it is then a query, and its error is reported where it is segmented)."""
    try:
        with Image.open(path) as im:
            im.draft(None, (256, 256))
            small = im.copy()
            small.thumbnail((256, 256), Image.Resampling.NEAREST)
            return _distinct(np.asarray(small), 8) <= 8
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def find_images(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """Expand files and folders (not recursive) into (image files, what was passed over: other files, the
    subfolders, and the masks that sit next to their photos).

    In a folder, a ``.png`` with the stem of another image there (``cat.jpg`` + ``cat.png``, the layout of
    FSS-1000 and of this README's own examples) that holds a handful of values is that photo's mask, not a
    query."""
    images: list[Path] = []
    others: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            children = [c for c in sorted(p.iterdir()) if not c.name.startswith(".")]
            pictures = [c for c in children if c.is_file() and c.suffix.lower() in IMAGE_EXTENSIONS]
            photo_stems = {c.stem for c in pictures if c.suffix.lower() != ".png"}
            for child in children:
                mask = (
                    child.suffix.lower() == ".png" and child.stem in photo_stems and _looks_like_mask(child)
                )
                (images if child in pictures and not mask else others).append(child)
        elif p.exists():
            images.append(p)  # named explicitly: try it whatever its extension
        else:
            raise DataError(f"query {p} does not exist")
    return images, others


def output_names(paths: Sequence[Path]) -> list[str]:
    """Output base names: the file stem, or stem + extension where two queries share a stem."""
    stems: dict[str, int] = {}
    for p in paths:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    names, used = [], set()
    for p in paths:
        base = p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}"
        name, n = base, 2
        while name in used:  # same stem and extension in two folders
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        names.append(name)
    return names


@dataclass
class FolderSummary:
    done: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    outputs: list[tuple[Path, Path]] = field(default_factory=list)

    #: (query, highest foreground probability) of the queries whose mask came back (nearly) empty
    empty: list[tuple[Path, float]] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"{len(self.done)} image(s) segmented, {len(self.skipped)} skipped"]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        if self.empty:
            lines.append(
                f"  {len(self.empty)} of them with no object found (an empty mask): "
                + ", ".join(f"{p.name} (highest probability {top:.2f})" for p, top in self.empty[:8])
                + (" ..." if len(self.empty) > 8 else "")
                + "; a lower --threshold, or more supports, may find it"
            )
        kinds = (
            ("subfolder(s) not searched", lambda q: q.is_dir()),
            (
                "mask(s) next to their photos passed over",
                lambda q: q.suffix.lower() == ".png" and q.is_file(),
            ),
            ("non-image file(s) passed over", lambda q: True),
        )
        left = list(self.ignored)
        for label, test in kinds:
            group = [q for q in left if test(q)]
            left = [q for q in left if q not in group]
            if group:
                shown = ", ".join(q.name for q in group[:5])
                more = f" and {len(group) - 5} more" if len(group) > 5 else ""
                lines.append(f"  {len(group)} {label}: {shown}{more}")
        return "\n".join(lines)


def save_png(path: Path, array: np.ndarray) -> Path:
    from dedn.utils.io import atomic_write

    image = Image.fromarray(array)
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_jpeg(path: Path, array: np.ndarray, quality: int = 90) -> Path:
    from dedn.utils.io import atomic_write

    image = Image.fromarray(array)
    return atomic_write(path, lambda f: image.save(f, format="JPEG", quality=quality))


def save_labels(path: Path, labels: np.ndarray, classes: int) -> Path:
    """A label map as a palette PNG: pixel value k = class k (0 background), shown in each class's
    overlay colour by image viewers."""
    from dedn.utils.io import atomic_write
    from dedn.vis import label_palette

    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(label_palette(classes))
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def predict_files(
    predictor: Predictor,
    support_set: SupportSet | Mapping[str, SupportSet],
    queries: Sequence[Path],
    out_dir: Path,
    progress: bool = True,
    ignored: Sequence[Path] = (),
    report: Callable[[str], None] | None = None,
    threshold: float = 0.5,
) -> FolderSummary:
    """Segment every query file, writing ``<name>_mask.png`` (0/255) and ``<name>_overlay.jpg``.

    With several classes (``support_set`` a mapping of class names to support sets, more than one):
    ``<name>_labels.png`` instead of the mask, a palette PNG whose value k is the k-th class
    (:meth:`Predictor.predict_classes`), and the overlay in one colour per class.

    ``threshold``: the foreground probability above which a pixel is the object (0.5: the model's own
    decision). A query that cannot be read is reported (``report``, default: stderr) and skipped; the
    others go on. A query whose mask comes back empty is reported with its highest probability.
    """
    from tqdm import tqdm

    from dedn.vis import overlay, overlay_labels

    classes = dict(support_set) if isinstance(support_set, Mapping) else None
    if classes is not None and len(classes) == 1:
        support_set, classes = next(iter(classes.values())), None

    out_dir = Path(out_dir)
    make_dir(out_dir, "--out folder")
    summary = FolderSummary(ignored=list(ignored))
    bar = tqdm(
        list(zip(queries, output_names(queries), strict=True)),
        desc="predict",
        unit="img",
        disable=not progress,
    )

    def say(message: str) -> None:
        if report is not None:
            report(message)
        else:
            bar.write(message, file=sys.stderr)

    for path, name in bar:
        try:
            query = load_image(path)
        except DataError as e:
            summary.skipped.append((path, str(e)))
            say(f"skipped {path}: {e}")
            continue
        if classes is not None:
            found = predictor.predict_classes_loaded(query, classes, threshold)
            if not found.labels.any():
                tops = ", ".join(
                    f"{c} {float(p.max(initial=0.0)):.2f}"
                    for c, p in zip(found.class_names, found.probabilities, strict=True)
                )
                summary.empty.append((path, float(found.probabilities.max(initial=0.0))))
                say(f"no class found in {path} (highest probabilities: {tops}; threshold {threshold})")
            labels_path = save_labels(out_dir / f"{name}_labels.png", found.labels, len(classes))
            overlay_path = save_jpeg(
                out_dir / f"{name}_overlay.jpg", overlay_labels(found.image, found.labels)
            )
            summary.done.append(path)
            summary.outputs.append((labels_path, overlay_path))
            continue
        result = predictor.predict_loaded(query, support_set, return_experts=False)
        mask = (result.probability > threshold).astype(np.uint8)
        if not mask.any() and not result.empty_support:
            top = float(result.probability.max(initial=0.0))
            summary.empty.append((path, top))
            say(
                f"no object found in {path} (highest foreground probability {top:.2f}, threshold {threshold})"
            )
        mask_path = save_png(out_dir / f"{name}_mask.png", mask * np.uint8(255))
        overlay_path = save_jpeg(out_dir / f"{name}_overlay.jpg", overlay(result.image, mask))
        summary.done.append(path)
        summary.outputs.append((mask_path, overlay_path))
    bar.close()
    return summary


def _default_pretrained_name() -> str:
    from dedn.pretrained import pretrained_models

    return pretrained_models()["default"]
