"""Pictures: overlays, the episode grid (also through ``dedn eval --save-vis``) and training curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dedn.cli import main
from dedn.errors import DataError
from dedn.vis import (
    GRID_CAPTION,
    GRID_HEADER,
    GRID_PAD,
    PREDICTION_COLOR,
    GridRow,
    episode_grid,
    grid_size,
    mask_iou,
    overlay,
    plot_training_curves,
    read_metrics,
)
from usage_helpers import make_checkpoint, scene


def test_overlay_tints_the_object_and_leaves_the_rest():
    image = np.full((20, 30, 3), 100, np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 1
    mask[0, 0] = 255
    out = overlay(image, mask, color=(255, 0, 0), alpha=0.5, outline=True)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[10, 15], [178, 50, 50])  # inside: half way to red
    np.testing.assert_array_equal(out[5, 15], [255, 0, 0])  # the outline is solid
    np.testing.assert_array_equal(out[18, 25], [100, 100, 100])  # background untouched
    assert out[0, 0, 0] > 100  # ignore is greyed
    with pytest.raises(DataError):
        overlay(image, mask[:10])


def test_mask_iou():
    truth = np.array([[1, 1, 0, 255]], np.uint8)
    assert mask_iou(np.array([[1, 0, 0, 1]]), truth) == pytest.approx(0.5)  # the 255 pixel is left out
    assert mask_iou(np.zeros((1, 4)), np.zeros((1, 4), np.uint8)) is None


def _row(k: int, seed: int) -> GridRow:
    supports = [scene(40, 60, seed=seed + i) for i in range(k)]
    query, truth = scene(50, 40, (5, 5, 30, 30), seed=seed + 10)
    pred = np.zeros_like(truth)
    pred[5:30, 5:20] = 1  # covers 60% of the object
    return GridRow(
        supports=supports,
        query=query,
        truth=truth,
        predictions={"object": pred, "scenario": truth.copy(), "fused": pred},
        fusion_weights={"object": 0.6, "scenario": 0.4},
        title=f"episode {seed}",
    )


def test_episode_grid_layout(tmp_path):
    tile = 64
    rows = [_row(2, 0), _row(2, 5), _row(2, 9)]
    path = episode_grid(rows, tmp_path / "grid.png", tile=tile)
    image = Image.open(path)
    # 2 supports + query + 3 predictions = 6 columns of tiles with a margin around each
    expected = (6 * tile + 7 * GRID_PAD, GRID_HEADER + 3 * (GRID_CAPTION + tile + GRID_PAD) + GRID_PAD)
    assert image.size == grid_size(3, 6, tile) == expected
    pixels = np.asarray(image.convert("RGB")).astype(int)
    # the "scenario" tile (column 4) of the first row is the query with the object tinted red
    x0 = GRID_PAD + 4 * (tile + GRID_PAD)
    y0 = GRID_HEADER + GRID_CAPTION
    cell = pixels[y0 + 20 : y0 + tile - 8, x0 + 16 : x0 + 30]  # inside the object, below the IoU label
    red = np.array(PREDICTION_COLOR)
    assert np.abs(cell - red).sum(axis=2).mean() < np.abs(cell - [220, 180, 40]).sum(axis=2).mean()


def test_episode_grid_needs_rows(tmp_path):
    with pytest.raises(DataError):
        episode_grid([], tmp_path / "x.png")


def _write_metrics(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_read_metrics_merges_a_resumed_run(tmp_path):
    records = [{"step": s, "loss/total": 1.0 / s, "loss/ce": 0.5 / s, "lr": 0.1} for s in (10, 20, 30)]
    records.append({"step": 30, "val/miou": 0.25, "val/fbiou": 0.5})
    # the run crashed after step 30 and was resumed from its step-20 checkpoint
    records += [{"step": s, "loss/total": 2.0 / s, "loss/ce": 1.0 / s} for s in (30, 40)]
    records.append({"step": 40, "val/miou": float("nan")})
    path = _write_metrics(tmp_path / "metrics.jsonl", records, tail='{"step": 50, "loss/to')
    series = read_metrics(path)
    steps, values = series["loss/total"]
    assert steps == [10, 20, 30, 40]
    assert values[2] == pytest.approx(2.0 / 30)  # the resumed run's value replaces the first one
    assert series["val/miou"] == ([30], [0.25])  # NaN left out
    with pytest.raises(DataError, match="does not exist"):
        read_metrics(tmp_path / "missing.jsonl")


def test_plot_training_curves(tmp_path):
    records = []
    for s in range(20, 401, 20):
        records.append(
            {
                "step": s,
                "loss/total": 1.0 + 10.0 / s,
                "loss/expert_ce": 5.0 / s,
                "loss/distill": 0.1,
                "lr": 0.01,
                "seconds": s / 10,
            }
        )
        if s % 100 == 0:
            records.append({"step": s, "val/miou": 0.2 + s / 2000, "val/fbiou": 0.5})
    path = plot_training_curves(_write_metrics(tmp_path / "metrics.jsonl", records), tmp_path / "curves.png")
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape == (600, 900, 3)
    blue = np.abs(image - [31, 119, 180]).sum(axis=2) < 30  # loss/total, drawn first
    green = np.abs(image - [44, 160, 44]).sum(axis=2) < 30  # val/miou (and loss/distill) in the charts
    assert blue[:300].sum() > 200 and blue[300:].sum() < 50  # the loss curve sits in the top chart
    assert green[300:].sum() > 100


def test_plot_training_curves_without_validation(tmp_path):
    records = [{"step": 1, "loss/total": 1.0}, {"step": 2, "loss/total": 0.5}]
    path = _write_metrics(tmp_path / "m.jsonl", records)
    out = plot_training_curves(path, tmp_path / "c.png", width=500, panel_height=200)
    assert Image.open(out).size == (500, 400)


def test_eval_save_vis(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "toy.pt")
    out = tmp_path / "run"
    args = ["eval", "--checkpoint", str(ckpt), "--output", str(out), "--quiet", "--save-vis", "3"]
    for key, value in [
        ("model.backbone", "toy"),
        ("model.weights", "null"),
        ("model.channels", "16"),
        ("data.image_size", "64"),
        ("eval.episodes", "4"),
        ("eval.seeds", "[0, 1]"),
        ("data.synthetic.images_per_class", "4"),
        ("data.synthetic.image_size", "96"),
    ]:
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    assert "episodes.png (3 of seed 0)" in capsys.readouterr().out
    image = Image.open(out / "episodes.png")
    # 1 support + query + object, scenario, fused = 5 columns, 3 rows, default tile 160
    assert image.size == grid_size(3, 5, 160)
