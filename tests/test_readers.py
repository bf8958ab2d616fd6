"""Readers (VOC, COCO json, class folders) and the class pixel index, on tiny trees made in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from dedn.data.base import IGNORE_INDEX
from dedn.data.coco import COCOSource
from dedn.data.folders import ClassFolderSource
from dedn.data.index import class_pixel_counts, ignore_value, index_path
from dedn.data.voc import VOCSource, read_mask, read_rgb
from dedn.errors import DataError

VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [7, 7, 7] * 253  # index 255 -> (7, 7, 7)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _palette_png(path: Path, label: np.ndarray) -> None:
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette(VOC_PALETTE)
    im.save(path)


def make_voc(root: Path, labels: dict[str, np.ndarray]) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    for k, (image_id, label) in enumerate(labels.items()):
        h, w = label.shape
        Image.fromarray(_rgb(h, w, k)).save(root / "JPEGImages" / f"{image_id}.jpg")
        _palette_png(root / "SegmentationClassAug" / f"{image_id}.png", label)
    (root / "val.txt").write_text("".join(f"{i}\n" for i in labels))
    return root


def voc_labels() -> dict[str, np.ndarray]:
    a = np.zeros((12, 16), np.uint8)
    a[2:6, 3:9] = 1
    a[6, :] = 255
    a[8:12, 10:16] = 15
    b = np.zeros((10, 14), np.uint8)
    b[:, :7] = 20
    return {"2007_000001": a, "2007_000002": b}


# ------------------------------------------------------------------------------------------------ VOC
def test_voc_reads_palette_indices_and_rgb(tmp_path):
    labels = voc_labels()
    src = VOCSource(make_voc(tmp_path / "voc", labels), split="val")
    assert src.ids == list(labels)
    assert src.num_classes == 20 and src.class_names[0] == "aeroplane" and src.class_names[19] == "tvmonitor"
    image, label = src.load_pair("2007_000001")
    assert image.dtype == np.uint8 and image.shape == (12, 16, 3)
    # palette indices, not the palette colours
    np.testing.assert_array_equal(label, labels["2007_000001"])
    assert label.dtype == np.uint8


def test_voc_fingerprint_follows_the_data_not_where_or_when_it_was_written(tmp_path, monkeypatch):
    import shutil

    root = make_voc(tmp_path / "voc", voc_labels())
    here = VOCSource(root, split="val").fingerprint()
    # another place, a relative root, and a copy that does not keep the timestamps (a fresh download,
    # a container mount): the same data, so the same episode files and feature store apply
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "voc", copy_function=shutil.copyfile)
    for p in copy.rglob("*"):
        os.utime(p, ns=(1, 1))
    assert VOCSource(copy, split="val").fingerprint() == here
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert VOCSource(Path("voc"), split="val").fingerprint() == here
    # a label rewritten in place at the same byte size is a change
    label = copy / "SegmentationClassAug" / "2007_000001.png"
    data = bytearray(label.read_bytes())
    data[-20] ^= 0xFF
    label.write_bytes(bytes(data))
    assert VOCSource(copy, split="val").fingerprint() != here
    # so is an image of another size
    image = root / "JPEGImages" / "2007_000002.jpg"
    image.write_bytes(image.read_bytes() + b"\0")
    assert VOCSource(root, split="val").fingerprint() != here


def test_coco_fingerprint_follows_the_annotations_and_the_images(tmp_path):
    root = make_coco(tmp_path / "coco")
    here = COCOSource(root).fingerprint()
    for p in root.rglob("*"):
        os.utime(p, ns=(1, 1))
    assert COCOSource(root).fingerprint() == here
    ann = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = data["annotations"][1]["category_id"]
    ann.write_text(json.dumps(data))
    assert COCOSource(root).fingerprint() != here
    src = COCOSource(root)
    src.image_path(src.ids[0]).unlink()
    with pytest.raises(DataError, match="missing"):
        src.fingerprint()


def test_voc_split_variants(tmp_path):
    root = make_voc(tmp_path / "voc", voc_labels())
    # no list: every label in the folder, sorted
    assert VOCSource(root, split=None).ids == ["2007_000001", "2007_000002"]
    # ImageSets/Segmentation/<split>.txt
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000002\n")
    assert VOCSource(root, split="train").ids == ["2007_000002"]
    # a PFENet-style pair list given as a path; duplicates are dropped
    pair_list = tmp_path / "list.txt"
    pair_list.write_text(
        "JPEGImages/2007_000002.jpg SegmentationClassAug/2007_000002.png\n\n"
        "JPEGImages/2007_000001.jpg SegmentationClassAug/2007_000001.png\n"
        "JPEGImages/2007_000002.jpg SegmentationClassAug/2007_000002.png\n"
    )
    assert VOCSource(root, split=pair_list).ids == ["2007_000002", "2007_000001"]
    assert VOCSource(root, ids=["2007_000001"]).ids == ["2007_000001"]


def test_voc_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        VOCSource(tmp_path / "nowhere")
    root = make_voc(tmp_path / "voc", voc_labels())
    with pytest.raises(DataError, match="split list 'test' not found"):
        VOCSource(root, split="test")
    # listed id whose files are missing
    src = VOCSource(root, ids=["2007_000001", "2007_999999"])
    with pytest.raises(DataError, match=r"2007_999999\.jpg"):
        src.load_image("2007_999999")
    with pytest.raises(DataError, match=r"mask file not found: .*2007_999999\.png"):
        src.load_label("2007_999999")
    with pytest.raises(DataError, match="missing"):
        src.fingerprint()
    # a label with a value outside 0..20/255
    bad = np.zeros((12, 16), np.uint8)
    bad[0, 0] = 30
    _palette_png(root / "SegmentationClassAug" / "2007_000001.png", bad)
    with pytest.raises(DataError, match=r"2007_000001.*values \[30\]"):
        src.load_label("2007_000001")
    # an RGB colour mask is not a class-index mask
    Image.fromarray(_rgb(10, 14)).save(root / "SegmentationClassAug" / "2007_000002.png")
    with pytest.raises(DataError, match="RGB image; expected a palette"):
        src.load_label("2007_000002")


def test_voc_size_mismatch(tmp_path):
    root = make_voc(tmp_path / "voc", voc_labels())
    _palette_png(root / "SegmentationClassAug" / "2007_000002.png", np.zeros((9, 14), np.uint8))
    with pytest.raises(DataError, match=r"2007_000002\.jpg.*mask is 14x9 .* image is 14x10"):
        VOCSource(root).load_pair("2007_000002")


# ------------------------------------------------------------------------------------ image decoding
def test_read_rgb_converts_modes(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_rgb(tmp_path / "g.png")
    assert out.shape == (6, 8, 3) and (out[..., 0] == gray).all() and (out[..., 2] == gray).all()
    rgba = np.dstack([_rgb(6, 8), np.full((6, 8), 9, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "a.png"), rgba[..., :3])
    Image.new("CMYK", (8, 6), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    cmyk = read_rgb(tmp_path / "c.jpg")
    assert cmyk.shape == (6, 8, 3) and cmyk.dtype == np.uint8
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # magenta-ish: red high, green low


def test_read_rgb_rejects_garbage_and_truncated(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(DataError, match=r"cannot decode image .*garbage\.jpg"):
        read_rgb(tmp_path / "garbage.jpg")
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot decode image .*cut\.jpg"):
        read_rgb(tmp_path / "cut.jpg")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataError, match=r"cannot decode mask .*garbage\.png"):
        read_mask(tmp_path / "garbage.png")


# ----------------------------------------------------------------------------------------------- COCO
def _square(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def make_coco(root: Path, split: str = "val2017") -> Path:
    """Image 1 (20x30): polygon (cat 1), compressed RLE overlapping it (cat 3), uncompressed crowd RLE
    (cat 90) over both and over background; image 2 (10x10) without annotations."""
    h, w = 20, 30
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(_rgb(h, w)).save(root / split / "000000000001.jpg")
    Image.fromarray(_rgb(10, 10, 1)).save(root / split / "000000000002.jpg")
    rle_obj = np.zeros((h, w), np.uint8, order="F")
    rle_obj[5:15, 10:20] = 1
    compressed = mask_utils.encode(np.asfortranarray(rle_obj))
    crowd = np.zeros((h, w), np.uint8)
    crowd[0:20, 18:30] = 1
    flat = crowd.flatten(order="F")  # uncompressed RLE: run lengths in column-major order, starting with 0s
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    data = {
        "images": [
            {"id": 2, "file_name": "000000000002.jpg", "height": 10, "width": 10},
            {"id": 1, "file_name": "000000000001.jpg", "height": h, "width": w},
        ],
        # listed out of id order on purpose: the overlap rule must follow annotation ids, not json order
        "annotations": [
            {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 0,
             "segmentation": {"size": [h, w], "counts": compressed["counts"].decode()}},
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [_square(2, 2, 12, 12), [1, 1, 2, 2]]},
            {"id": 13, "image_id": 1, "category_id": 90, "iscrowd": 1,
             "segmentation": {"size": [h, w], "counts": runs}},
        ],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
                       {"id": 3, "name": "car"}],
    }  # fmt: skip
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_coco_rasterises_polygon_rle_and_crowd(tmp_path):
    src = COCOSource(make_coco(tmp_path / "coco"), "val2017")
    assert src.class_names == ["person", "car", "toothbrush"]
    assert src.category_to_class == {1: 1, 3: 2, 90: 3}
    assert src.ids == ["000000000001", "000000000002"]
    image, label = src.load_pair("000000000001")
    assert image.shape == (20, 30, 3) and label.shape == (20, 30)
    poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([_square(2, 2, 12, 12)], 20, 30)))
    rle = np.zeros((20, 30), bool)
    rle[5:15, 10:20] = True
    crowd = np.zeros((20, 30), bool)
    crowd[:, 18:] = True
    # later annotation (id 12, car) wins over the polygon where they overlap
    assert (label[rle] == 2).all()
    assert (label[poly.astype(bool) & ~rle] == 1).all()
    # crowd marks only pixels no object claims
    assert (label[crowd & ~rle] == IGNORE_INDEX).all()
    assert (label[rle & crowd] == 2).all()
    assert (label[~(crowd | rle | poly.astype(bool))] == 0).all()
    # an image without annotations is all background
    assert (src.load_label("000000000002") == 0).all()


def test_coco_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        COCOSource(tmp_path / "nowhere")
    root = make_coco(tmp_path / "coco")
    with pytest.raises(DataError, match=r"instances_train2017\.json not found"):
        COCOSource(root, "train2017")
    ann_file = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["category_id"] = 77
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match="category id 77"):
        COCOSource(root)
    data["annotations"][0]["category_id"] = 3
    data["annotations"][0]["segmentation"]["size"] = [21, 30]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotation 12 .*RLE size \[21, 30\] differs"):
        COCOSource(root).load_label("000000000001")
    ann_file.write_text("{not json")
    with pytest.raises(DataError, match="cannot read COCO annotations"):
        COCOSource(root)


# -------------------------------------------------------------------------------------- class folders
def make_folders(root: Path) -> Path:
    for cls, value in (("zebra", 255), ("apple", 1)):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(_rgb(8, 10, k)).save(root / cls / f"{k + 1}.jpg")
            mask = np.zeros((8, 10), np.uint8)
            mask[: k + 2, :5] = value
            Image.fromarray(mask, mode="L").save(root / cls / f"{k + 1}.png")
    (root / ".hidden").mkdir()
    return root


def test_class_folders(tmp_path):
    src = ClassFolderSource(make_folders(tmp_path / "fss"))
    assert src.class_names == ["apple", "zebra"]  # sorted; hidden folders skipped
    assert src.ids == [f"apple/{k}" for k in (1, 2, 3)] + [f"zebra/{k}" for k in (1, 2, 3)]
    image, label = src.load_pair("zebra/2")  # 0/255 mask
    assert image.shape == (8, 10, 3)
    assert set(np.unique(label).tolist()) == {0, 2} and (label == 2).sum() == 3 * 5
    assert set(np.unique(src.load_label("apple/1")).tolist()) == {0, 1}  # 0/1 mask
    only = ClassFolderSource(tmp_path / "fss", classes=["zebra"])
    assert only.class_names == ["zebra"] and len(only) == 3


def test_class_folders_mask_values(tmp_path):
    root = make_folders(tmp_path / "fss")
    soft = np.zeros((8, 10), np.uint8)
    soft[:4] = 200
    soft[4:6] = 100
    Image.fromarray(soft, mode="L").save(root / "zebra" / "1.png")
    with pytest.raises(DataError, match=r"zebra/1\.png has values \[100, 200\].*threshold=128"):
        ClassFolderSource(root).load_label("zebra/1")
    label = ClassFolderSource(root, threshold=128).load_label("zebra/1")
    assert (label[:4] == 2).all() and (label[4:] == 0).all()
    # RGB 0/255 masks (as some FSS-1000 files are) are accepted
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[:3] = 255
    Image.fromarray(rgb).save(root / "zebra" / "1.png")
    assert (ClassFolderSource(root).load_label("zebra/1") == 2).sum() == 30
    # 0/1 masks may use 255 as ignore
    m = np.zeros((8, 10), np.uint8)
    m[0] = 1
    m[1] = 255
    Image.fromarray(m, mode="L").save(root / "apple" / "1.png")
    label = ClassFolderSource(root).load_label("apple/1")
    assert (label[0] == 1).all() and (label[1] == IGNORE_INDEX).all() and (label[2:] == 0).all()


def test_class_folders_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ClassFolderSource(tmp_path / "nowhere")
    root = make_folders(tmp_path / "fss")
    with pytest.raises(DataError, match=r"class folder\(s\) \['pear'\] not found"):
        ClassFolderSource(root, classes=["pear"])
    os.remove(root / "apple" / "2.png")
    with pytest.raises(DataError, match=r"apple/2\.jpg has no mask .*apple/2\.png"):
        ClassFolderSource(root).ids  # noqa: B018
    Image.fromarray(np.zeros((8, 10), np.uint8), mode="L").save(root / "apple" / "2.png")
    Image.fromarray(np.zeros((7, 10), np.uint8), mode="L").save(root / "apple" / "3.png")
    with pytest.raises(DataError, match=r"apple/3\.jpg .*mask is 10x7"):
        ClassFolderSource(root).load_pair("apple/3")


def test_class_folders_with_many_classes_use_uint16(tmp_path):
    """FSS-1000 has 1,000 classes: ids above 254 must survive, and 255 is then a class, not ignore."""
    root = tmp_path / "many"
    names = [f"c{k:03d}" for k in range(300)]
    for name in names:
        (root / name).mkdir(parents=True)
    for name in (names[254], names[299]):  # class ids 255 and 300
        Image.fromarray(_rgb(8, 8)).save(root / name / "1.jpg")
        m = np.zeros((8, 8), np.uint8)
        m[:4] = 255
        Image.fromarray(m, mode="L").save(root / name / "1.png")
    src = ClassFolderSource(root)
    assert ignore_value(src) is None
    label = src.load_label(f"{names[299]}/1")
    assert label.dtype == np.uint16 and int(label.max()) == 300
    counts = class_pixel_counts(src)
    assert counts == {f"{names[254]}/1": {255: 32}, f"{names[299]}/1": {300: 32}}


# ------------------------------------------------------------------------------------------- the index
def test_class_pixel_counts_and_cache(tmp_path, monkeypatch):
    labels = voc_labels()
    root = make_voc(tmp_path / "voc", labels)
    src = VOCSource(root)
    counts = class_pixel_counts(src)
    assert counts == {"2007_000001": {1: 24, 15: 24}, "2007_000002": {20: 70}}
    path = index_path(src)
    assert path.is_file() and path.parent == Path(os.environ["DEDN_CACHE_DIR"]) / "index"
    assert path.name.startswith("pascal-")

    # the second call reads the cache, without decoding a label
    def fail(image_id):
        raise AssertionError("label decoded although the index is cached")

    monkeypatch.setattr(src, "_read_label", fail)
    assert class_pixel_counts(src) == counts
    monkeypatch.undo()

    # a changed label changes the fingerprint, so the cache is rebuilt
    new = labels["2007_000002"].copy()
    new[:, :] = 0
    new[0, 0] = 5
    _palette_png(root / "SegmentationClassAug" / "2007_000002.png", new)
    src2 = VOCSource(root)
    assert index_path(src2) != path
    assert class_pixel_counts(src2)["2007_000002"] == {5: 1}


def test_class_pixel_counts_rejects_bad_values(tmp_path):
    labels = voc_labels()
    labels["2007_000002"][0, 0] = 21
    src = VOCSource(make_voc(tmp_path / "voc", labels))
    with pytest.raises(DataError, match=r"2007_000002.*values \[21\]"):
        class_pixel_counts(src, use_cache=False)


def test_class_pixel_counts_explicit_cache_root(tmp_path):
    src = VOCSource(make_voc(tmp_path / "voc", voc_labels()))
    class_pixel_counts(src, cache_root=tmp_path / "mycache")
    assert list((tmp_path / "mycache" / "index").glob("pascal-*.json"))
    assert not index_path(src).exists()  # the default cache folder was not touched
