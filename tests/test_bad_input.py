"""Bad input and faults: each case ends in a message naming the setting or file, exit status 2, no
traceback, and nothing already written is touched. Also the protocol options of the same issue: a
pair list in HSNet's format, the missing-class policy and the test-time padding colour."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dedn.cli import main
from dedn.config import load_config
from dedn.data.protocol import read_pair_list
from dedn.data.transforms import PAD_RGB, TestTransform
from dedn.engine.benchmark import build_benchmark
from dedn.engine.checkpoint import load_checkpoint, load_trained_model, save_checkpoint
from dedn.errors import CheckpointError, ConfigError, DataError, OutputError
from dedn.metrics import FewShotIoU
from dedn.predict import Predictor
from dedn.utils.io import check_dir, make_dir
from test_engine import TINY as ENGINE_TINY
from usage_helpers import episode_files, make_checkpoint, save_rgb, scene

#: the engine tests' tiny run, shortened
TINY = [*ENGINE_TINY, "train.steps=4", "train.val_every=4", "eval.episodes=8", "eval.seeds=[0]"]


def _sets(*extra: str) -> list[str]:
    return [a for s in (*TINY, *extra) for a in ("--set", s)]


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy.pt")


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.steps=0", "train.steps = 0"),
        ("train.steps=-5", "train.steps = -5"),
        ("train.batch_size=0", "train.batch_size = 0"),
        ("train.lr=nan", "train.lr = nan"),
        ("train.lr=.inf", "train.lr = inf"),
        ("train.lr=0", "train.lr = 0.0"),
        ("train.val_every=0", "train.val_every = 0"),
        ("train.checkpoint_every=0", "train.checkpoint_every = 0"),
        ("train.log_every=0", "train.log_every = 0"),
        ("model.channels=0", "model.channels = 0"),
        ("model.dropout=1.0", "model.dropout = 1.0"),
        ("model.fusion.temperature=0", "model.fusion.temperature = 0.0"),
        ("loss.contrast.weight=-1", "loss.contrast.weight = -1.0"),
        ("train.augment.scale=[1.2, 0.8]", "train.augment.scale"),
        ("eval.seeds=[]", "eval.seeds = []"),
        ("eval.episodes=0", "eval.episodes = 0"),
        ("eval.missing_class=nan", "eval.missing_class"),
        ("data.fold=-1", "data.fold = -1"),
    ],
)
def test_a_bad_setting_is_refused_before_any_work(override, named, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--output", str(out), *_sets(override)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dedn: error: ") and named in err and "Traceback" not in err
    assert not out.exists()  # nothing was written


def test_the_defaults_and_every_shipped_config_pass_the_range_checks():
    load_config(None)
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        load_config(path)


def test_a_nan_anywhere_in_the_config_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  object:\n    ocg:\n      temperature: .nan\n")
    with pytest.raises(ConfigError, match=r"model.object.ocg.temperature = nan; expected a finite number"):
        load_config(config)


# --------------------------------------------------------------------------------------------- outputs
def test_predict_out_on_or_under_a_file_is_refused(toy_ckpt, tmp_path, capsys):
    episode_files(tmp_path)
    blocker = tmp_path / "results.txt"
    blocker.write_text("keep me")
    for out, says in ((blocker, "is a file"), (blocker / "sub" / "dir", f"lies under {blocker}")):
        code = main(
            ["predict", "--checkpoint", str(toy_ckpt), "--support", str(tmp_path / "s.png"),
             str(tmp_path / "m.png"), "--query", str(tmp_path / "q.png"), "--out", str(out), "--quiet"]
        )  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and "--out folder" in err and says in err and "Traceback" not in err
    assert blocker.read_text() == "keep me"


def test_train_and_eval_output_under_a_file_are_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--quiet", "--output", str(blocker / "run"), *_sets()]) == 2
    assert "lies under" in capsys.readouterr().err
    assert main(["eval", "--quiet", "--output", str(blocker), *_sets("model.method=proto")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_make_dir_and_check_dir(tmp_path):
    assert make_dir(tmp_path / "a" / "b").is_dir()
    assert check_dir(tmp_path / "new" / "c") == tmp_path / "new" / "c"
    assert not (tmp_path / "new").exists()  # check_dir creates nothing
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        make_dir(tmp_path / "f")


# ----------------------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_whose_config_is_a_string_is_refused(toy_ckpt, tmp_path):
    state = load_checkpoint(toy_ckpt)
    state["config"] = "model: dedn"
    save_checkpoint(tmp_path / "c.pt", state)
    with pytest.raises(CheckpointError, match=r"c.pt: its 'config' entry is a str"):
        Predictor.from_checkpoint(tmp_path / "c.pt", device="cpu")
    state["config"], state["model"] = load_checkpoint(toy_ckpt)["config"], ["not", "a", "dict"]
    save_checkpoint(tmp_path / "m.pt", state)
    with pytest.raises(CheckpointError, match=r"m.pt: its 'model' entry"):
        Predictor.from_checkpoint(tmp_path / "m.pt", device="cpu")


def test_a_checkpoint_with_nan_weights_is_refused_everywhere(toy_ckpt, tmp_path, capsys):
    state = load_checkpoint(toy_ckpt)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], math.nan)
    bad = save_checkpoint(tmp_path / "nan.pt", state)
    with pytest.raises(CheckpointError, match=r"nan.pt: 1 weight tensor\(s\) hold NaN or infinite values"):
        Predictor.from_checkpoint(bad, device="cpu")
    cfg = Predictor.from_checkpoint(toy_ckpt, device="cpu").config
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_trained_model(cfg, str(bad), torch.device("cpu"))
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx"), "--no-verify"]) == 2
    assert "NaN" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- image and label size check
def _folders(root: Path, bad: str | None = None) -> Path:
    """Two classes x 3 images of 64 x 64 with a 50 x 50 object; the image ``bad`` gets a 64 x 60 mask."""
    for c in ("apple", "zebra"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            image, mask = scene(64, 64, (7, 7, 57, 57), seed=10 * i + len(c))
            save_rgb(root / c / f"{i}.jpg", image)
            if f"{c}/{i}" == bad:
                mask = mask[:, :60]
            Image.fromarray(mask * 255).save(root / c / f"{i}.png")
    return root


def test_an_image_and_label_of_different_sizes_are_caught_at_evaluation(tmp_path, capsys):
    root = _folders(tmp_path / "data", bad="zebra/1")
    sets = _sets("data.benchmark=folders", f"data.root={root}", "data.min_pixels=16", "model.method=proto")
    out = tmp_path / "eval"
    assert main(["eval", "--quiet", "--output", str(out), *sets]) == 2
    err = capsys.readouterr().err
    assert "zebra" in err and "1.jpg" in err and "mask is 60x64 (WxH) but the image is 64x64" in err
    assert not (out / "results.json").exists()
    # the same set with matching sizes is scored
    good = _folders(tmp_path / "good")
    sets = _sets("data.benchmark=folders", f"data.root={good}", "data.min_pixels=16", "model.method=proto")
    assert main(["eval", "--quiet", "--output", str(tmp_path / "eval-good"), *sets]) == 0


# ----------------------------------------------------------------------------------------- missing class
def test_missing_class_skip_or_zero():
    metric = FewShotIoU([1, 2])
    target = torch.zeros(4, 4, dtype=torch.int64)
    target[:2] = 1
    metric.update(target.clone(), target, 1)  # class 1 perfect, class 2 never scored
    with pytest.warns(RuntimeWarning, match="mean over the other 1 of 2"):
        skip = metric.compute()
    with pytest.warns(RuntimeWarning, match="count as IoU 0"):
        zero = metric.compute("zero")
    assert skip["miou"] == 1.0 and zero["miou"] == 0.5
    assert skip["missing_classes"] == zero["missing_classes"] == [2]
    assert skip["class_iou"][2] is None and zero["class_iou"][2] is None
    with pytest.raises(ConfigError, match="missing"):
        metric.compute("drop")
    full = FewShotIoU([1])
    full.update(target.clone(), target, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert full.compute("zero")["miou"] == full.compute("skip")["miou"] == 1.0


# --------------------------------------------------------------------------------------------- pair list
def test_a_pair_list_in_hsnet_format_replaces_the_test_pairs(tmp_path):
    sets = [s for s in TINY if s.startswith("data.")]
    bench = build_benchmark(load_config(None, sets).data)
    chosen = bench.split.test_pairs[::3]
    lines = (
        ["# a comment", ""]
        + [f"{p.image_id}__{p.class_id:02d}" for p in chosen]
        + [
            f"{chosen[0].image_id}__{chosen[0].class_id}"  # a repeat, kept once
        ]
    )
    listing = tmp_path / "fold0.txt"
    listing.write_text("\n".join(lines) + "\n")
    listed = build_benchmark(load_config(None, [*sets, f"data.pair_list={listing}"]).data)
    assert listed.split.test_pairs == chosen
    assert listed.pair_list and listed.episode_meta(1, 0, 5)["pair_list"] == listed.pair_list
    assert "pair_list" not in bench.episode_meta(1, 0, 5)  # old episode files stay valid

    counts = {p.image_id: {p.class_id: 100} for p in chosen}
    novel = bench.split.novel
    base = next(c for c in range(1, 30) if c not in novel)
    image = chosen[0].image_id
    for line, says in (
        ("2007_000033", "expected <image id>__<class id>"),
        (f"{image}__x", "expected <image id>__<class id>"),
        (f"{image}__{base}", f"class {base} is not a novel class"),
        (f"nope__{chosen[0].class_id}", "image 'nope' is not in the test set"),
        (f"{image}__{next(c for c in novel if c != chosen[0].class_id)}", "shows no pixel of class"),
    ):
        listing.write_text(f"{image}__{chosen[0].class_id}\n{line}\n")
        with pytest.raises(DataError, match=rf"fold0.txt, line 2 .*{says}"):
            read_pair_list(listing, counts, novel)
    with pytest.raises(DataError, match="does not exist"):
        read_pair_list(tmp_path / "none.txt", counts, novel)


def test_a_pair_list_gets_its_own_episode_files(tmp_path):
    listing = tmp_path / "pairs.txt"
    sets = [s for s in TINY if s.startswith("data.")]
    bench = build_benchmark(load_config(None, sets).data)
    listing.write_text("\n".join(f"{p.image_id}__{p.class_id}" for p in bench.split.test_pairs[::2]))
    common = ["--quiet", *_sets("model.method=proto", f"eval.episode_dir={tmp_path / 'ep'}")]
    assert main(["eval", "--output", str(tmp_path / "a"), *common]) == 0
    assert main(["eval", "--output", str(tmp_path / "b"), *common, "--set", f"data.pair_list={listing}"]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["per_seed"][0]["episode_file"] != b["per_seed"][0]["episode_file"]
    assert b["settings"]["pair_list"] == str(listing)


# ------------------------------------------------------------------------------------------ padding fill
def test_test_transform_pads_with_its_fill():
    image = np.full((20, 40, 3), 200, np.uint8)
    for fill in (PAD_RGB, (0.0, 0.0, 0.0)):
        out, _, (h, w) = TestTransform(64, fill)(image)
        assert (h, w) == (32, 64)
        assert torch.allclose(out[:, h:, :], torch.tensor(fill).view(3, 1, 1).expand(3, 64 - h, 64))
        assert torch.allclose(out[:, :h, :], torch.full((3, h, w), 200 / 255))
    assert TestTransform(64).fill == tuple(PAD_RGB)
    with pytest.raises(ConfigError, match="fill"):
        TestTransform(64, (0.0, 2.0, 0.0))


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Results, checkpoints and shipped weights are readable like any file written with open()."""
    import os

    from dedn.utils.io import atomic_write_text

    path = atomic_write_text(tmp_path / "r.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
