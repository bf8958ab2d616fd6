"""A procedurally generated few-shot segmentation benchmark that needs no download.

:class:`SyntheticSource` draws small scenes of textured shapes. It is the project's embedded default
benchmark (demo, fast tests, CPU training runs), so it is built to behave like the real ones where it
matters to few-shot segmentation:

* **Classes are learnable and generalise.** A class is a shape family (disc, ring, square, triangle, star,
  ...) with a class-specific appearance: a texture taken from one of the photographs bundled inside
  scikit-image (``skimage.data``; only files shipped in the wheel, so nothing is downloaded) and a class
  tint. Instances vary in size, rotation, aspect, position, texture crop and colour, so a support
  image shows the class but never the query's exact object.
* **Scenes are cluttered.** Backgrounds are desaturated photo crops, colour gradients or smooth colour
  noise with varied brightness; some images carry small untextured clutter shapes labelled background,
  so "segment the salient object" is not enough.
* **The protocol's rules matter.** Every image has one main object of its class; about 30 % also hold a
  second object of another class (so a novel class can appear in training images, and a query can hold
  a distractor of a base class). The main object covers roughly 14-40 % of the image and its visible,
  labelled area is guaranteed to be at least 9 % of ``image_size**2`` (2,304 pixels at the default 160,
  above the protocol's 2,048-pixel eligibility threshold); second objects may be smaller, partly hidden
  or below the threshold, like real ones.
* **VOC-like labels.** ``0`` background, ``1..num_classes``, and optionally a thin 255 band along object
  contours (``ignore_border`` pixels on each side; default 1), like VOC's boundary annotation.
* **Varied aspect ratios.** A third of the images are square, a third landscape and a third portrait
  (the shorter side is 3/4 of ``image_size``), so the resize-and-pad path of the transforms is exercised.

Everything is deterministic: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so any
image can be generated on its own, in any order, in any worker. The class definitions (shape, photo,
tint) do not depend on ``seed``: sources with different seeds are different draws of the same classes.
Generated images are cached in memory (about 85 kB per image at 160 px, 50 MB for the default 600).
"""

from __future__ import annotations

import colorsys
import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from dedn.data.base import IGNORE_INDEX, SegmentationSource
from dedn.errors import ConfigError, DataError

# Bump whenever the generator's output changes, so caches keyed by fingerprint() are invalidated.
GENERATOR_VERSION = 1

#: The protocol's eligibility threshold (PROTOCOL.md) and the image size it is guaranteed at.
_PROTOCOL_MIN_PIXELS = 2048
_DEFAULT_SIZE = 160
# The main object's visible labelled area is at least this fraction of image_size**2.
_MIN_MAIN_FRACTION = 0.09

ID_PREFIX = "syn_"

# Photographs shipped inside the scikit-image wheel (checked to load with the network disabled). The
# order matters: class k takes its texture from photo k modulo the list.
_PHOTO_NAMES = (
    "brick",
    "coffee",
    "grass",
    "chelsea",
    "gravel",
    "rocket",
    "coins",
    "immunohistochemistry",
    "camera",
    "astronaut",
    "moon",
    "hubble_deep_field",
    "retina",
    "page",
    "clock",
    "cell",
    "stereo_motorcycle",
    "text",
    "colorwheel",
    "logo",
)
_PHOTO_MAX_SIDE = 512  # larger photos are downscaled once: crops are resized to <= 160 px anyway


# -------------------------------------------------------------------------------------------- shapes
# Each shape is an implicit function of normalised coordinates (u right, v down) that fits roughly in
# the unit disc, plus `jitter` (4 uniforms in [0, 1) drawn per instance) for families with free
# parameters. Returns a boolean mask "inside".
ShapeFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _polygon(points: list[tuple[float, float]]) -> ShapeFn:
    """Even-odd point-in-polygon test (works for concave polygons)."""
    pts = np.asarray(points, dtype=np.float64)

    def inside(u: np.ndarray, v: np.ndarray, jitter: np.ndarray) -> np.ndarray:
        result = np.zeros(u.shape, dtype=bool)
        x0, y0 = pts[-1]
        for x1, y1 in pts:
            crosses = (y0 > v) != (y1 > v)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
            result ^= crosses & (u < x_at)
            x0, y0 = x1, y1
        return result

    return inside


def _regular(n: int, radius: float, phase: float = 0.0) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star_points(n: int, outer: float, inner: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = outer if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _disc(u, v, j):
    return u * u + v * v < 1.0


def _ring(u, v, j):
    r2 = u * u + v * v
    return (r2 < 1.0) & (r2 > 0.55**2)


def _square(u, v, j):
    return np.maximum(np.abs(u), np.abs(v)) < 0.72


def _cross(u, v, j):
    au, av = np.abs(u), np.abs(v)
    return ((au < 0.3) & (av < 0.92)) | ((av < 0.3) & (au < 0.92))


def _crescent(u, v, j):
    return (u * u + v * v < 1.0) & ((u - 0.5) ** 2 + (v + 0.1) ** 2 > 0.78**2)


def _ellipse(u, v, j):
    return u * u + (v / 0.5) ** 2 < 1.0


def _heart(u, v, j):
    x, y = u * 1.2, -v * 1.2 + 0.15  # the classic sextic heart, y up
    x2 = x * x
    t = x2 + y * y - 1.0
    return t * t * t < x2 * y * y * y  # products: float powers are several times slower


def _blob(u, v, j):
    # a smooth random blob: radius modulated by two harmonics with per-instance phases and amplitudes
    theta = np.arctan2(v, u)
    r = np.sqrt(u * u + v * v)
    edge = 0.78 * (
        1.0
        + (0.12 + 0.1 * j[0]) * np.sin(3 * theta + 6.283 * j[1])
        + (0.06 + 0.08 * j[2]) * np.sin(5 * theta + 6.283 * j[3])
    )
    return r < edge


def _diamond(u, v, j):
    return np.abs(u) / 0.62 + np.abs(v) < 1.0


def _frame(u, v, j):
    m = np.maximum(np.abs(u), np.abs(v))
    return (m < 0.74) & (m > 0.44)


def _semicircle(u, v, j):
    v = v - 0.42  # flat side at v = 0.42: the half disc's centroid sits at the origin
    return (u * u + v * v < 1.0) & (v < 0.0)


def _tshape(u, v, j):
    au = np.abs(u)
    return ((au < 0.9) & (v > -0.85) & (v < -0.4)) | ((au < 0.24) & (v > -0.85) & (v < 0.9))


def _hourglass(u, v, j):
    av = np.abs(v)
    return (np.abs(u) < 0.08 + 0.8 * av) & (av < 0.9)


def _gear(u, v, j):
    theta = np.arctan2(v, u)
    r = np.sqrt(u * u + v * v)
    teeth = np.where(np.sin(8 * theta) > 0, 1.0, 0.8)
    return (r < teeth) & (r > 0.28)


def _teardrop(u, v, j):
    t = (v + 1.0) / 2.0  # 0 at the tip (top), 1 at the round bottom: the piriform curve
    return (t > 0) & (t < 1) & (u * u < 4.0 * t**3 * (1.0 - t))


@dataclass(frozen=True)
class _ShapeFamily:
    name: str
    inside: ShapeFn
    rotation: float  # half-range of per-instance rotation in degrees around the canonical pose
    jittered: bool = False  # the shape depends on the per-instance jitter (else its measure is cached)


_SHAPES: tuple[_ShapeFamily, ...] = (
    _ShapeFamily("disc", _disc, 180.0),
    _ShapeFamily("ring", _ring, 180.0),
    _ShapeFamily("square", _square, 20.0),
    _ShapeFamily("triangle", _polygon(_regular(3, 1.0, -math.pi / 2)), 25.0),
    _ShapeFamily("star", _polygon(_star_points(5, 1.0, 0.42)), 180.0),
    _ShapeFamily("cross", _cross, 20.0),
    _ShapeFamily("crescent", _crescent, 180.0),
    _ShapeFamily("ellipse", _ellipse, 180.0),
    _ShapeFamily("hexagon", _polygon(_regular(6, 0.95)), 180.0),
    _ShapeFamily("heart", _heart, 25.0),
    _ShapeFamily(
        "lshape",
        _polygon([(-0.65, -0.9), (-0.15, -0.9), (-0.15, 0.45), (0.7, 0.45), (0.7, 0.9), (-0.65, 0.9)]),
        30.0,
    ),
    _ShapeFamily(
        "arrow",
        _polygon(
            [(-0.95, -0.2), (0.15, -0.2), (0.15, -0.6), (0.95, 0.0), (0.15, 0.6), (0.15, 0.2), (-0.95, 0.2)]
        ),
        30.0,
    ),
    _ShapeFamily("blob", _blob, 180.0, jittered=True),
    _ShapeFamily("diamond", _diamond, 20.0),
    _ShapeFamily("frame", _frame, 20.0),
    _ShapeFamily("semicircle", _semicircle, 30.0),
    _ShapeFamily("tshape", _tshape, 25.0),
    _ShapeFamily("hourglass", _hourglass, 25.0),
    _ShapeFamily("gear", _gear, 180.0),
    _ShapeFamily("teardrop", _teardrop, 30.0),
)

#: Names of the built-in shape families (the default 20 class names, in class order 1..20).
SHAPE_NAMES: tuple[str, ...] = tuple(s.name for s in _SHAPES)

# normalised coordinates used to measure a shape's area and extent
_MEASURE = np.linspace(-1.5, 1.5, 121, dtype=np.float32)
_MEASURE_U, _MEASURE_V = np.meshgrid(_MEASURE, _MEASURE)
_MEASURE_CELL = float(_MEASURE[1] - _MEASURE[0]) ** 2
_MEASURE_CACHE: dict[str, tuple[float, float]] = {}


def _measure(family: _ShapeFamily, jitter: np.ndarray) -> tuple[float, float]:
    """Area (in normalised units) and largest distance from the origin of a shape instance."""
    cached = _MEASURE_CACHE.get(family.name)
    if cached is not None:
        return cached
    inside = family.inside(_MEASURE_U, _MEASURE_V, jitter)
    area = float(inside.sum()) * _MEASURE_CELL
    radius = float(np.sqrt(_MEASURE_U[inside] ** 2 + _MEASURE_V[inside] ** 2).max())
    if not family.jittered:
        _MEASURE_CACHE[family.name] = (area, radius)
    return area, radius


# -------------------------------------------------------------------------------------------- photos
def _procedural_photo(name: str) -> Image.Image:
    """Stand-in texture for a photo this scikit-image version does not ship (kept deterministic)."""
    rng = np.random.default_rng(int(hashlib.sha1(name.encode()).hexdigest()[:8], 16))
    small = rng.random((16, 16, 3))
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((256, 256), Image.BICUBIC)
    noise = rng.normal(0, 20, (256, 256, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


@lru_cache(maxsize=1)
def _photo_bank() -> tuple[tuple[Image.Image, ...], tuple[str, ...]]:
    """The bundled photographs as RGB PIL images, and the names of those that loaded (for fingerprints).

    Loaded once per process. A photo missing from the installed scikit-image is replaced by a
    deterministic procedural texture instead of failing, and the substitution shows in the fingerprint.
    """
    import skimage.data

    photos, loaded = [], []
    for name in _PHOTO_NAMES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = getattr(skimage.data, name)()
            if isinstance(arr, tuple):  # stereo_motorcycle returns (left, right, disparity)
                arr = arr[0]
            arr = np.asarray(arr)
            if arr.dtype != np.uint8:
                arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).astype(np.uint8)
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
            arr = arr[:, :, :3]
            img = Image.fromarray(np.ascontiguousarray(arr))
            if max(img.size) > _PHOTO_MAX_SIDE:
                f = _PHOTO_MAX_SIDE / max(img.size)
                img = img.resize((round(img.width * f), round(img.height * f)), Image.BILINEAR)
            photos.append(img)
            loaded.append(name)
        except Exception:  # noqa: BLE001 - any failure (missing file, no network) -> stand-in texture
            photos.append(_procedural_photo(name))
    return tuple(photos), tuple(loaded)


def _photo_crop(
    photo: Image.Image, out_hw: tuple[int, int], zoom: float, rng: np.random.Generator
) -> np.ndarray:
    """A random crop of ``photo`` spanning ``zoom`` of its shorter side, resized to ``out_hw``, in [0, 1]."""
    out_h, out_w = out_hw
    side = zoom * min(photo.size)
    crop_w = min(photo.width, side * max(1.0, out_w / out_h))
    crop_h = min(photo.height, side * max(1.0, out_h / out_w))
    x0 = rng.uniform(0, photo.width - crop_w)
    y0 = rng.uniform(0, photo.height - crop_h)
    img = photo.resize((out_w, out_h), Image.BILINEAR, box=(x0, y0, x0 + crop_w, y0 + crop_h))
    return np.asarray(img, dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------------------- classes
@dataclass(frozen=True)
class _ClassStyle:
    name: str
    shape: _ShapeFamily
    photo: int  # index into the photo bank
    zoom: float  # fraction of the photo's shorter side a texture crop covers
    tint: tuple[float, float, float]  # RGB in [0, 1]
    contrast: float  # how strongly the photo's luminance modulates the tint
    photo_mix: float  # share of the photo's own colours in the object


def _class_styles(num_classes: int) -> list[_ClassStyle]:
    """Fixed class definitions (independent of the seed): shape, texture photo, tint."""
    styles = []
    for k in range(num_classes):
        shape = _SHAPES[k % len(_SHAPES)]
        cycle = k // len(_SHAPES)
        name = shape.name if cycle == 0 else f"{shape.name}{cycle + 1}"
        # golden-ratio hue steps keep neighbouring classes far apart on the colour wheel
        hue = (0.07 + 0.618034 * k) % 1.0
        sat = 0.55 + 0.3 * ((k * 7) % 5) / 4
        val = 0.62 + 0.3 * ((k * 3) % 4) / 3
        styles.append(
            _ClassStyle(
                name=name,
                shape=shape,
                photo=(k + 3 * cycle) % len(_PHOTO_NAMES),
                zoom=0.25 + 0.5 * ((k * 5) % 7) / 6,
                tint=colorsys.hsv_to_rgb(hue, sat, val),
                contrast=0.5 + 0.5 * ((k * 3) % 5) / 4,
                photo_mix=0.15 + 0.25 * ((k * 2) % 3) / 2,
            )
        )
    return styles


# -------------------------------------------------------------------------------------------- drawing
@dataclass
class _Placed:
    """One rasterised object: its bounding box in the image, coverage (alpha) and texture."""

    y0: int
    x0: int
    alpha: np.ndarray  # (h, w) float32 coverage in [0, 1] (2x2 supersampled)
    colour: np.ndarray  # (h, w, 3) float32
    label: int  # class id (0 for clutter)


def _rasterise(
    inside: ShapeFn,
    jitter: np.ndarray,
    centre: tuple[float, float],
    scale: float,
    angle: float,
    aspect: float,
    extent: float,
    image_hw: tuple[int, int],
) -> tuple[int, int, np.ndarray] | None:
    """2x2-supersampled coverage of a transformed shape inside its clipped bounding box."""
    height, width = image_hw
    cy, cx = centre
    y0, y1 = max(0, int(cy - extent) - 1), min(height, int(cy + extent) + 2)
    x0, x1 = max(0, int(cx - extent) - 1), min(width, int(cx + extent) + 2)
    if y1 <= y0 or x1 <= x0:
        return None
    sub = np.array([0.25, 0.75], dtype=np.float32)
    ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + sub[None, :]).reshape(-1)  # pixel spans [y, y+1)
    xs = (np.arange(x0, x1, dtype=np.float32)[:, None] + sub[None, :]).reshape(-1)
    dx = xs[None, :] - np.float32(cx)
    dy = ys[:, None] - np.float32(cy)
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    # inverse similarity transform, then undo the aspect stretch (area-preserving)
    u = (cos * dx + sin * dy) * np.float32(1.0 / (scale * aspect))
    v = (-sin * dx + cos * dy) * np.float32(aspect / scale)
    hit = inside(u, v, jitter).view(np.uint8)  # bool -> 0/1 without a copy
    # coverage of each pixel = mean of its 2x2 subsamples
    counts = hit[0::2, 0::2] + hit[0::2, 1::2] + hit[1::2, 0::2] + hit[1::2, 1::2]
    return y0, x0, counts.astype(np.float32) * np.float32(0.25)


def _texture(
    style: _ClassStyle, photo: Image.Image, hw: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Class appearance for an object's box: the photo's luminance pattern on the class tint."""
    crop = _photo_crop(photo, hw, style.zoom * rng.uniform(0.8, 1.25), rng)
    lum = crop @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    # normalise the pattern's contrast so dark photos (moon, hubble) texture as visibly as bright ones
    pattern = (lum - lum.mean()) / (lum.std() + 0.05)
    tint = np.asarray(style.tint, dtype=np.float32)
    # slight per-instance colour jitter (brightness and a small tint shift)
    tint = np.clip(tint * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03, 3), 0.05, 1.0).astype(np.float32)
    colour = tint[None, None, :] * (1.0 + 0.35 * style.contrast * pattern[:, :, None])
    colour = (1 - style.photo_mix) * colour + style.photo_mix * crop
    return np.clip(colour, 0.0, 1.0).astype(np.float32)


def _background(hw: tuple[int, int], photos: tuple[Image.Image, ...], rng: np.random.Generator) -> np.ndarray:
    """A photo crop (desaturated), a two-colour gradient, or smooth colour noise, with varied brightness."""
    height, width = hw
    kind = rng.choice(3, p=[0.45, 0.3, 0.25])
    if kind == 0:
        photo = photos[int(rng.integers(len(photos)))]
        bg = _photo_crop(photo, hw, rng.uniform(0.3, 1.0), rng)
        grey = bg.mean(axis=2, keepdims=True)
        bg = grey + rng.uniform(0.2, 0.8) * (bg - grey)  # desaturate: objects carry the strong colours
    elif kind == 1:
        c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
        theta = rng.uniform(0, 2 * math.pi)
        ys = np.arange(height, dtype=np.float32)[:, None] * np.float32(math.sin(theta) / height)
        xs = np.arange(width, dtype=np.float32)[None, :] * np.float32(math.cos(theta) / width)
        t = ys + xs
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[..., None]
        c0, c1 = c0.astype(np.float32), c1.astype(np.float32)
        bg = c0 * (1 - t) + c1 * t
        bg = bg + np.float32(0.02) * rng.standard_normal(bg.shape, dtype=np.float32)
    else:
        cells = int(rng.integers(3, 8))
        small = rng.uniform(0.1, 0.9, (cells, cells, 3))
        grey = small.mean(axis=2, keepdims=True)
        small = ((grey + rng.uniform(0.3, 0.8) * (small - grey)) * 255).astype(np.uint8)
        bg = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32) / 255
    bg = bg * np.float32(rng.uniform(0.6, 1.2))
    return np.clip(bg, 0.0, 1.0, dtype=np.float32)


def _ignore_band(label: np.ndarray, radius: int) -> np.ndarray:
    """Mask of pixels with a differently labelled pixel within ``radius`` (Chebyshev distance)."""
    lo = label.copy()
    hi = label.copy()
    for _ in range(radius):
        for axis in (0, 1):
            for shift in (1, -1):
                rolled_lo = np.roll(lo, shift, axis=axis)
                rolled_hi = np.roll(hi, shift, axis=axis)
                # np.roll wraps around: restore the wrapped row/column so the image edge is no contour
                edge = 0 if shift == 1 else -1
                if axis == 0:
                    rolled_lo[edge] = lo[edge]
                    rolled_hi[edge] = hi[edge]
                else:
                    rolled_lo[:, edge] = lo[:, edge]
                    rolled_hi[:, edge] = hi[:, edge]
                lo = np.minimum(lo, rolled_lo)
                hi = np.maximum(hi, rolled_hi)
    return lo != hi


# ---------------------------------------------------------------------------------------------- source
class SyntheticSource(SegmentationSource):
    """Procedurally generated few-shot segmentation benchmark (see the module docstring).

    Args:
        seed: seeds every image (image ``i`` uses ``numpy.random.default_rng([seed, i])``).
        num_classes: number of object classes (1..254); the first 20 are the distinct shape families of
            :data:`SHAPE_NAMES`, further classes reuse a family with another photo and tint ("disc2", ...).
        images_per_class: images whose main object is of each class; the source holds
            ``num_classes * images_per_class`` images, image ``i`` has main class ``i % num_classes + 1``.
        image_size: longer image side in pixels (>= 32). The 2,048-pixel eligibility guarantee holds for
            ``image_size >= 151``; for smaller images use :attr:`min_pixels` as the threshold.
        ignore_border: half-width in pixels of the 255 band along object contours (0 disables).
        second_object: probability that an image also holds an object of another class.
    """

    name = "synthetic"

    def __init__(
        self,
        seed: int = 0,
        num_classes: int = 20,
        images_per_class: int = 30,
        image_size: int = _DEFAULT_SIZE,
        ignore_border: int = 1,
        second_object: float = 0.3,
    ):
        for arg, value, lo, hi in (
            ("num_classes", num_classes, 1, 254),
            ("images_per_class", images_per_class, 1, 10**6),
            ("image_size", image_size, 32, 4096),
            ("ignore_border", ignore_border, 0, 8),
        ):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
                raise ConfigError(f"SyntheticSource {arg} must be an integer in [{lo}, {hi}], got {value!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"SyntheticSource seed must be a non-negative integer, got {seed!r}")
        if not 0.0 <= float(second_object) <= 1.0:
            raise ConfigError(f"SyntheticSource second_object must be in [0, 1], got {second_object!r}")
        self._styles = _class_styles(int(num_classes))
        super().__init__([s.name for s in self._styles])
        self.seed = int(seed)
        self.images_per_class = int(images_per_class)
        self.image_size = int(image_size)
        self.ignore_border = int(ignore_border)
        self.second_object = float(second_object)
        self._ids = [f"{ID_PREFIX}{i:05d}" for i in range(self.num_classes * self.images_per_class)]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # ----------------------------------------------------------------------------- source interface
    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def min_pixels(self) -> int:
        """An eligibility threshold every image's main object meets: the protocol's 2,048 pixels for
        ``image_size >= 151``, and 9 % of ``image_size**2`` for smaller images (whose objects cannot
        reach 2,048 pixels; pass this as ``min_pixels`` to the protocol functions then).
        """
        return min(_PROTOCOL_MIN_PIXELS, math.floor(_MIN_MAIN_FRACTION * self.image_size**2))

    def describe(self, image_id: str) -> str:
        index = self._index(image_id)
        return (
            f"synthetic image {image_id} (seed={self.seed}, index={index}, image_size={self.image_size}, "
            f"num_classes={self.num_classes})"
        )

    def main_class(self, image_id: str) -> int:
        """Class id (1..num_classes) of the image's main object."""
        return self._index(image_id) % self.num_classes + 1

    def fingerprint(self) -> str:
        _, loaded = _photo_bank()
        try:
            import skimage

            skimage_version = skimage.__version__
        except Exception:  # noqa: BLE001
            skimage_version = "none"
        import PIL  # resampling of photo crops may differ between Pillow versions

        key = (
            f"synthetic|v{GENERATOR_VERSION}|seed={self.seed}|classes={self.num_classes}|"
            f"per_class={self.images_per_class}|size={self.image_size}|border={self.ignore_border}|"
            f"second={self.second_object}|skimage={skimage_version}|pillow={PIL.__version__}|"
            f"photos={','.join(loaded)}"
        )
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def _read_image(self, image_id: str) -> np.ndarray:
        return self._generate(self._index(image_id))[0].copy()

    def _read_label(self, image_id: str) -> np.ndarray:
        return self._generate(self._index(image_id))[1].copy()

    def __reduce__(self):
        # rebuild from the settings: the shape functions are closures (not picklable) and the cache is
        # better regenerated in a data-loader worker than shipped to it
        return (
            type(self),
            (
                self.seed,
                self.num_classes,
                self.images_per_class,
                self.image_size,
                self.ignore_border,
                self.second_object,
            ),
        )

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(seed={self.seed}, num_classes={self.num_classes}, "
            f"images_per_class={self.images_per_class}, image_size={self.image_size}: {len(self)} images)"
        )

    # ---------------------------------------------------------------------------------- generation
    def _index(self, image_id: str) -> int:
        is_id = isinstance(image_id, str) and image_id.startswith(ID_PREFIX)
        digits = image_id[len(ID_PREFIX) :] if is_id else ""
        if digits.isascii() and digits.isdigit():
            index = int(digits)
            if 0 <= index < len(self._ids):
                return index
        raise DataError(
            f"unknown synthetic image id {image_id!r}; expected '{ID_PREFIX}00000'..'{self._ids[-1]}' "
            f"(seed={self.seed}, {len(self._ids)} images)"
        )

    def _generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._cache.get(index)
        if cached is None:
            cached = self._draw(index)
            self._cache[index] = cached
        return cached

    def _draw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw image ``index``: (H, W, 3) uint8 RGB and (H, W) uint8 label."""
        rng = np.random.default_rng([self.seed, index])
        photos, _ = _photo_bank()
        size = self.image_size
        short = round(0.75 * size)
        height, width = ((size, size), (short, size), (size, short))[int(rng.integers(3))]
        hw = (height, width)
        area = height * width
        min_main = math.ceil(_MIN_MAIN_FRACTION * size * size)
        main_class = index % self.num_classes + 1

        background = _background(hw, photos, rng)
        base_label = np.zeros(hw, dtype=np.uint8)

        # untextured clutter first (labelled background), so it never hides a labelled object
        if rng.random() < 0.4:
            for _ in range(int(rng.integers(1, 3))):
                family = _SHAPES[int(rng.integers(len(_SHAPES)))]
                placed = self._place(family, None, rng, hw, rng.uniform(0.02, 0.06) * area, photos)
                if placed is not None:
                    self._composite(background, base_label, placed)

        main = None
        for _ in range(50):  # rejection sampling until the visible main object is large enough
            main = self._place(
                self._styles[main_class - 1].shape,
                main_class,
                rng,
                hw,
                math.exp(rng.uniform(math.log(0.14), math.log(0.40))) * area,
                photos,
            )
            if main is not None and int((main.alpha >= 0.5).sum()) >= min_main + self._border_loss(main):
                break
        else:  # unreachable with the built-in shapes; kept as a clear failure
            raise DataError(f"could not place the main object of synthetic image {index} (seed {self.seed})")

        second = None
        if self.num_classes > 1 and rng.random() < self.second_object:
            other = int(rng.integers(1, self.num_classes))  # 1..num_classes-1, skipping main_class
            other = other if other < main_class else other + 1
            on_top = rng.random() < 0.5
            for _ in range(10):
                second = self._place(
                    self._styles[other - 1].shape,
                    other,
                    rng,
                    hw,
                    math.exp(rng.uniform(math.log(0.04), math.log(0.18))) * area,
                    photos,
                )
                if second is not None:
                    break
        # drawn last so that the draws above do not depend on it
        contrast = rng.uniform(0.85, 1.1)
        noise = rng.standard_normal(background.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 0.025))

        layers_options = [[main]]
        if second is not None:
            layers_options.insert(0, [main, second] if on_top else [second, main])
        for layers in layers_options:
            image, label = background.copy(), base_label.copy()
            for placed in layers:
                self._composite(image, label, placed)
            if self.ignore_border > 0:
                label[_ignore_band(label, self.ignore_border)] = IGNORE_INDEX
            # the guarantee is checked on the final label: a second object on top may hide too much
            if int((label == main_class).sum()) >= min_main:
                break
        else:
            raise DataError(f"synthetic image {index} (seed {self.seed}): main object too small")

        # global photometric variation: slight contrast change and sensor noise
        image = (image - np.float32(0.5)) * np.float32(contrast) + np.float32(0.5) + noise
        out = np.clip(np.rint(image * np.float32(255.0)), 0, 255).astype(np.uint8)
        return out, label

    def _border_loss(self, placed: _Placed) -> int:
        """Upper estimate of the pixels the 255 band takes from an object (its contour times the width)."""
        if self.ignore_border == 0:
            return 0
        partial = int(((placed.alpha > 0) & (placed.alpha < 1)).sum())
        return 2 * partial * self.ignore_border

    def _place(
        self,
        family: _ShapeFamily,
        class_id: int | None,
        rng: np.random.Generator,
        hw: tuple[int, int],
        target_area: float,
        photos: tuple[Image.Image, ...],
    ) -> _Placed | None:
        """Draw pose and appearance of one object of ``family`` with about ``target_area`` pixels."""
        height, width = hw
        jitter = rng.random(4).astype(np.float32)
        unit_area, radius = _measure(family, jitter)
        aspect = math.exp(rng.uniform(-0.15, 0.15))
        angle = math.radians(rng.uniform(-family.rotation, family.rotation))
        scale = math.sqrt(target_area / unit_area)
        extent = scale * radius * max(aspect, 1 / aspect)
        # keep the object inside the frame where it fits; otherwise centre it with a little play
        cy, cx = (
            rng.uniform(extent, side - extent) if 2 * extent < side else side * (0.5 + rng.uniform(-0.1, 0.1))
            for side in (height, width)
        )
        raster = _rasterise(family.inside, jitter, (cy, cx), scale, angle, aspect, extent, hw)
        if raster is None or not (raster[2] >= 0.5).any():
            return None
        y0, x0, alpha = raster
        box = alpha.shape
        if class_id is None:  # clutter: a flat colour with a soft gradient, no class texture
            base = rng.uniform(0.15, 0.85, 3).astype(np.float32)
            ramp = np.linspace(-0.15, 0.15, box[0], dtype=np.float32)[:, None, None]
            colour = np.clip(base[None, None, :] + ramp, 0, 1) * np.ones((1, box[1], 1), np.float32)
            label = 0
        else:
            style = self._styles[class_id - 1]
            colour = _texture(style, photos[style.photo], box, rng)
            label = class_id
        return _Placed(y0, x0, alpha, colour.astype(np.float32), label)

    @staticmethod
    def _composite(image: np.ndarray, label: np.ndarray, placed: _Placed) -> None:
        h, w = placed.alpha.shape
        window = (slice(placed.y0, placed.y0 + h), slice(placed.x0, placed.x0 + w))
        a = placed.alpha[:, :, None]
        image[window] = a * placed.colour + (1 - a) * image[window]
        label[window][placed.alpha >= 0.5] = placed.label

    @staticmethod
    def _visible_after(below: _Placed, above: _Placed, hw: tuple[int, int]) -> int:
        """Pixels of ``below`` still labelled after ``above`` is drawn over it."""
        canvas = np.zeros(hw, dtype=bool)
        h, w = below.alpha.shape
        canvas[below.y0 : below.y0 + h, below.x0 : below.x0 + w] = below.alpha >= 0.5
        h, w = above.alpha.shape
        canvas[above.y0 : above.y0 + h, above.x0 : above.x0 + w] &= ~(above.alpha >= 0.5)
        return int(canvas.sum())
