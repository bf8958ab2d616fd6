"""Paired transforms: shapes, padding, image/label alignment, the inverse for scoring, determinism."""

import numpy as np
import pytest
import torch

from dedn.data.transforms import PAD_RGB, TestTransform, TrainTransform, restore_logits
from dedn.errors import ConfigError, DataError

# one colour per label value: an image painted from its label lets a test read the label back
PALETTE = np.array(
    [[20, 20, 20], [230, 30, 30], [30, 200, 40], [40, 60, 230], [240, 220, 30], [200, 40, 220]],
    dtype=np.uint8,
)
PAD = torch.tensor(PAD_RGB).view(3, 1, 1)


def _blocky_label(height: int, width: int, seed: int = 0, block: int = 12) -> np.ndarray:
    """Label with a few rectangles and a disc (values 0..5), rectangles at least ``block`` px wide."""
    rng = np.random.default_rng(seed)
    label = np.zeros((height, width), dtype=np.uint8)
    for value in range(1, 5):
        h = rng.integers(block, max(block + 1, height // 2))
        w = rng.integers(block, max(block + 1, width // 2))
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        label[y : y + h, x : x + w] = value
    yy, xx = np.mgrid[0:height, 0:width]
    label[(yy - height * 0.6) ** 2 + (xx - width * 0.4) ** 2 < (min(height, width) * 0.18) ** 2] = 5
    return label


def _interior(label: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood has one single label (and which are not 255).

    The frame counts as 255: what lies beyond the border of a crop is unknown.
    """
    lab = torch.nn.functional.pad(label.to(torch.float32)[None, None], (radius,) * 4, value=255.0)
    hi = torch.nn.functional.max_pool2d(lab, 2 * radius + 1, stride=1)
    lo = -torch.nn.functional.max_pool2d(-lab, 2 * radius + 1, stride=1)
    return ((hi == lo)[0, 0]) & (label != 255)


def _misaligned_fraction(
    image: torch.Tensor, label: torch.Tensor, radius: int = 3, tol: float = 0.03
) -> float:
    """Share of interior labelled pixels whose colour is not the palette colour of their label."""
    inside = _interior(label, radius)
    assert inside.sum() > 100, "too few interior pixels to judge alignment"
    expected = torch.from_numpy(PALETTE).float().div(255)[label.clamp(max=len(PALETTE) - 1)]  # (S, S, 3)
    err = (image.permute(1, 2, 0) - expected).abs().amax(dim=-1)
    return float((err[inside] > tol).float().mean())


# ------------------------------------------------------------------------------------------ TestTransform
@pytest.mark.parametrize(("hw", "scaled"), [((50, 80), (25, 40)), ((80, 50), (40, 25)), ((64, 64), (40, 40))])
def test_test_transform_shapes_and_padding(hw, scaled):
    label = _blocky_label(*hw)
    image, out_label, scaled_hw = TestTransform(40)(PALETTE[label], label)
    assert image.shape == (3, 40, 40) and image.dtype == torch.float32
    assert out_label.shape == (40, 40) and out_label.dtype == torch.int64
    assert scaled_hw == scaled
    h, w = scaled
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    # content has no ignore pixels (the input had none); the padding is 255 and PAD_RGB exactly
    assert (out_label[:h, :w] != 255).all()
    assert (out_label[h:, :] == 255).all() and (out_label[:, w:] == 255).all()
    pad_mask = out_label == 255
    assert torch.equal(image[:, pad_mask], PAD.view(3, 1).expand(3, int(pad_mask.sum())))


def test_test_transform_image_only_and_input_kinds():
    rgb = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    image, label, scaled_hw = TestTransform(24)(rgb)
    assert label is None and image.shape == (3, 24, 24) and scaled_hw == (24, 16)
    grey, _, _ = TestTransform(24)(rgb[:, :, 0])
    assert torch.equal(grey[0, :, :16], grey[1, :, :16])  # greyscale becomes three equal channels
    rgba = np.concatenate([rgb, np.full((30, 20, 1), 7, np.uint8)], axis=2)
    assert torch.equal(TestTransform(24)(rgba)[0], image)  # alpha is dropped


def test_test_transform_label_alone_matches_the_pair():
    label = _blocky_label(75, 100)
    transform = TestTransform(64)
    _, pair_label, pair_hw = transform(PALETTE[label], label)
    image, alone_label, alone_hw = transform(None, label)
    assert image is None and alone_hw == pair_hw == transform.scaled_hw(label.shape) == (48, 64)
    assert torch.equal(alone_label, pair_label)
    with pytest.raises(DataError, match="neither"):
        transform(None, None)


def test_test_transform_keeps_alignment():
    for hw in [(75, 100), (100, 75), (37, 61)]:
        label = _blocky_label(*hw, seed=hw[0])
        for size in (48, 130):  # down- and up-scaling
            image, out_label, _ = TestTransform(size)(PALETTE[label], label)
            assert _misaligned_fraction(image, out_label) == 0.0


def test_test_transform_bad_input():
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(DataError, match="same size"):
        TestTransform(16)(image, np.zeros((20, 31), np.uint8))
    with pytest.raises(DataError, match="uint8"):
        TestTransform(16)(image.astype(np.float32))
    with pytest.raises(ConfigError):
        TestTransform(0)


# ----------------------------------------------------------------------------------------- restore_logits
@pytest.mark.parametrize("hw", [(75, 100), (100, 75), (30, 41)])
def test_restore_logits_inverts_test_transform(hw):
    label = _blocky_label(*hw, seed=3)
    for size in (64, 160):
        _, out_label, scaled_hw = TestTransform(size)(PALETTE[label], label)
        onehot = torch.nn.functional.one_hot(out_label.clamp(max=5), 6).permute(2, 0, 1).float()[None]
        restored = restore_logits(onehot, scaled_hw, hw)
        assert restored.shape == (1, 6, *hw)
        pred = restored.argmax(1)[0].numpy()
        agree = (pred == label).mean()
        assert agree > 0.97, (size, agree)
        # disagreements only at region boundaries
        interior = _interior(torch.from_numpy(label), radius=2).numpy()
        assert (pred[interior] == label[interior]).all()


def test_restore_logits_identity_and_batches():
    logits = torch.randn(2, 3, 16, 16)
    assert torch.equal(restore_logits(logits, (16, 10), (16, 10)), logits[:, :, :16, :10])
    # a default_collate'd batch: (h, w) becomes two (B,) tensors, or a (B, 2) tensor
    collated = [torch.tensor([12, 12]), torch.tensor([16, 16])]
    assert restore_logits(logits, collated, (24, 32)).shape == (2, 3, 24, 32)
    assert restore_logits(logits, torch.tensor([[12, 16], [12, 16]]), (24, 32)).shape == (2, 3, 24, 32)
    with pytest.raises(DataError, match="different sizes"):
        restore_logits(logits, [torch.tensor([12, 16]), torch.tensor([16, 16])], (24, 32))
    with pytest.raises(DataError, match="larger"):
        restore_logits(logits, (20, 16), (24, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_restore_logits_on_gpu_matches_cpu():
    logits = torch.randn(2, 2, 32, 32)
    out = restore_logits(logits.cuda(), (24, 32), (45, 60))
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), restore_logits(logits, (24, 32), (45, 60)), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- TrainTransform
def test_train_transform_keeps_alignment_over_many_draws():
    # wide augmentation ranges so that rotation, flips, blur, crops and padding all occur
    transform = TrainTransform(64, scale=(0.8, 1.25), rotate=30.0, blur=0.5, flip=0.5)
    for seed in range(40):
        hw = [(64, 96), (96, 64), (80, 80)][seed % 3]
        label = _blocky_label(*hw, seed=seed, block=24)
        image, out_label = transform(PALETTE[label], label, np.random.default_rng(seed))
        assert image.shape == (3, 64, 64) and out_label.shape == (64, 64)
        assert image.dtype == torch.float32 and out_label.dtype == torch.int64
        assert set(torch.unique(out_label).tolist()) <= {0, 1, 2, 3, 4, 5, 255}
        assert _misaligned_fraction(image, out_label) < 0.002, seed
        if seed == 0:  # the check has teeth: a label flipped against its image is caught
            assert _misaligned_fraction(image, torch.flip(out_label, [1])) > 0.2


def test_train_transform_padding_outside_the_image():
    label = _blocky_label(40, 60)
    label[10:12, :] = 255  # an ignore stripe in the input stays ignore
    # scaled to 0.5: a 30 x 20 image centred in a 60 x 60 crop
    transform = TrainTransform(60, scale=(0.5, 0.5), rotate=0.0, blur=0.0, flip=0.0)
    image, out_label = transform(PALETTE[np.minimum(label, 5)], label, np.random.default_rng(0))
    assert (out_label[:20, :] == 255).all() and (out_label[40:, :] == 255).all()
    assert (out_label[:, :15] == 255).all() and (out_label[:, 45:] == 255).all()
    assert (out_label[25, 15:45] == 255).all()
    assert (out_label[21:25, 16:44] != 255).all() and (out_label[26:39, 16:44] != 255).all()
    pad_mask = torch.ones(60, 60, dtype=torch.bool)
    pad_mask[20:40, 15:45] = False  # everything outside the 30 x 20 content is padding
    torch.testing.assert_close(image[:, pad_mask], PAD.view(3, 1).expand(3, int(pad_mask.sum())))
    # rotation: the corners of a full-frame square crop leave the image and become padding
    square = _blocky_label(60, 60)
    rotated = TrainTransform(60, scale=(1.0, 1.0), rotate=45.0, blur=0.0, flip=0.0)
    for seed in range(5):
        image, out_label = rotated(PALETTE[square], square, np.random.default_rng(seed))
        if (out_label[0, 0] == 255) and (out_label[-1, -1] == 255):
            torch.testing.assert_close(image[:, 0, 0], PAD[:, 0, 0])
            break
    else:
        pytest.fail("no rotation of up to 45 degrees produced padded corners")


def test_train_transform_identity_settings_and_flip():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    label = rng.integers(0, 6, (32, 32)).astype(np.uint8)
    plain = TrainTransform(32, scale=(1.0, 1.0), rotate=0.0, blur=0.0, flip=0.0)
    image, out_label = plain(rgb, label, np.random.default_rng(1))
    assert torch.equal(image, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert torch.equal(out_label, torch.from_numpy(label).long())
    flipped = TrainTransform(32, scale=(1.0, 1.0), rotate=0.0, blur=0.0, flip=1.0)
    image_f, label_f = flipped(rgb, label, np.random.default_rng(1))
    assert torch.equal(label_f, torch.flip(out_label, [1]))
    torch.testing.assert_close(image_f, torch.flip(image, [2]), atol=1e-5, rtol=0)


def test_train_transform_blur_touches_the_image_only():
    label = _blocky_label(50, 50)
    rgb = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)  # pixel noise
    sharp = TrainTransform(40, blur=0.0)(rgb, label, np.random.default_rng(5))
    soft = TrainTransform(40, blur=1.0)(rgb, label, np.random.default_rng(5))
    assert torch.equal(sharp[1], soft[1])  # same geometry: the blur draw does not shift other draws

    def roughness(img: torch.Tensor) -> float:
        return float((img[:, :, 1:] - img[:, :, :-1]).abs().mean())

    assert roughness(soft[0]) < 0.5 * roughness(sharp[0])


def test_train_transform_is_deterministic_given_the_rng():
    label = _blocky_label(60, 80)
    rgb = PALETTE[label]
    transform = TrainTransform(48)
    a = transform(rgb, label, np.random.default_rng(123))
    b = transform(rgb, label, np.random.default_rng(123))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rng = np.random.default_rng(123)
    outputs = [transform(rgb, label, rng) for _ in range(4)]
    assert any(not torch.equal(outputs[0][0], o[0]) for o in outputs[1:])  # the rng state advances


def test_train_transform_rejects_bad_settings():
    for kwargs in ({"scale": (1.2, 0.9)}, {"rotate": -1.0}, {"blur": 1.5}, {"flip": -0.1}):
        with pytest.raises(ConfigError):
            TrainTransform(32, **kwargs)
    with pytest.raises(DataError, match="same size"):
        image, label = np.zeros((10, 10, 3), np.uint8), np.zeros((10, 11), np.uint8)
        TrainTransform(32)(image, label, np.random.default_rng(0))
