"""Episode sampling, episode files, and the episode datasets (with a tiny in-memory source)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dedn.data.base import SegmentationSource
from dedn.data.episodes import (
    Episode,
    EpisodeDataset,
    TrainEpisodeDataset,
    binarize,
    collate_episodes,
    episode_meta,
    read_episodes,
    sample_test_episodes,
    sample_train_episode,
    train_episode,
    validate_episodes,
    write_episodes,
)
from dedn.data.protocol import Pair, pairs_by_class
from dedn.errors import DataError

S = 8  # transform output size


class ArraySource(SegmentationSource):
    """12 small images; image k shows class 1 + k % 3 (a block), class 4 in a corner and an ignore row."""

    name = "arrays"

    def __init__(self, n: int = 12):
        super().__init__([f"class{c}" for c in range(1, 7)])
        self._ids = [f"im{k:02d}" for k in range(n)]

    @property
    def ids(self) -> list[str]:
        return self._ids

    def describe(self, image_id: str) -> str:
        return f"array {image_id}"

    def _k(self, image_id: str) -> int:
        return int(image_id[2:])

    def _read_image(self, image_id: str) -> np.ndarray:
        k = self._k(image_id)
        return np.full((6 + k % 4, 10, 3), k * 10, dtype=np.uint8)

    def _read_label(self, image_id: str) -> np.ndarray:
        k = self._k(image_id)
        label = np.zeros((6 + k % 4, 10), dtype=np.uint8)
        label[1:5, 2:8] = 1 + k % 3
        label[0, 0:2] = 4
        label[-1, :] = 255
        return label

    def fingerprint(self) -> str:
        return f"arrays-{len(self._ids)}"


class StandInTransform:
    """Nearest-neighbour resize to S x S (a stand-in for dedn.data.transforms.TestTransform)."""

    def __call__(self, image: np.ndarray, label: np.ndarray):
        h, w = label.shape
        rows = np.arange(S) * h // S
        cols = np.arange(S) * w // S
        image_t = torch.from_numpy(image[rows][:, cols].transpose(2, 0, 1).astype(np.float32) / 255.0)
        label_t = torch.from_numpy(label[rows][:, cols].astype(np.int64))
        return image_t, label_t, (S, S)


class StandInTrainTransform:
    """Resize as above, plus a random horizontal flip drawn from the episode's generator."""

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        image_t, label_t, _ = StandInTransform()(image, label)
        if rng.random() < 0.5:
            image_t, label_t = image_t.flip(-1), label_t.flip(-1)
        return image_t, label_t


def _pairs(n: int = 12) -> list[Pair]:
    return [Pair(f"im{k:02d}", 1 + k % 3) for k in range(n)]


def _meta(shots: int, seed: int, n: int) -> dict:
    return episode_meta("synthetic", 0, shots, seed, n, "arrays-12", convention="consecutive")


# ------------------------------------------------------------------------------------------ sampling
def test_test_episodes_follow_the_rules():
    pairs = _pairs()
    classes = pairs_by_class(pairs)
    episodes = sample_test_episodes(pairs, n=30, shots=2, seed=3)
    assert len(episodes) == 30
    # the first len(pairs) episodes visit every pair once; then the same permutation cycles
    assert sorted(Pair(e.query, e.class_id) for e in episodes[:12]) == sorted(pairs)
    assert [e.query for e in episodes[12:24]] == [e.query for e in episodes[:12]]
    for e in episodes:
        assert Pair(e.query, e.class_id) in pairs
        assert len(set(e.supports)) == 2 and e.query not in e.supports
        assert all(s in classes[e.class_id] for s in e.supports)
    # the support draws are fresh on each cycle (not a copy of the first pass)
    assert [e.supports for e in episodes[12:24]] != [e.supports for e in episodes[:12]]
    assert sample_test_episodes(pairs, 30, 2, seed=3) == episodes
    assert sample_test_episodes(pairs, 30, 2, seed=4) != episodes


def test_too_many_shots_names_the_class():
    pairs = _pairs(12) + [Pair("im00", 5), Pair("im01", 5)]
    with pytest.raises(
        DataError, match=r"class 5 \(class5\) has 1 image\(s\) .* but 2 shot\(s\) were requested"
    ):
        sample_test_episodes(pairs, n=50, shots=2, seed=0, class_names=[f"class{c}" for c in range(1, 7)])
    with pytest.raises(DataError, match=r"class 1 has 3 image\(s\) .* but 4 shot"):
        sample_test_episodes(_pairs(12), n=5, shots=4, seed=0)
    with pytest.raises(DataError, match="no test pairs"):
        sample_test_episodes([], n=5, shots=1, seed=0)


def test_support_pool_can_differ_from_the_queries():
    queries = [Pair("im00", 1)]
    support_pool = [Pair("im03", 1), Pair("im06", 1)]
    episodes = sample_test_episodes(queries, n=4, shots=2, seed=0, support_pairs=support_pool)
    assert all(set(e.supports) == {"im03", "im06"} for e in episodes)


def test_train_episodes_are_pure_functions_of_seed_and_index():
    by_class = {1: ["im00", "im03", "im06", "im09"], 2: ["im01", "im04", "im07"], 3: ["im02"]}
    first = [train_episode(by_class, 1, seed=7, index=i) for i in range(40)]
    assert first == [train_episode(by_class, 1, seed=7, index=i) for i in range(40)]
    assert train_episode(by_class, 1, seed=7, index=5) == first[5]  # no hidden state between calls
    assert first != [train_episode(by_class, 1, seed=8, index=i) for i in range(40)]
    assert {e.class_id for e in first} == {1, 2}  # class 3 has one image: it cannot form an episode
    for e in first:
        assert e.query in by_class[e.class_id] and e.supports[0] in by_class[e.class_id]
        assert e.query not in e.supports
    # 3-shot: only class 1 has more than 3 images
    assert {train_episode(by_class, 3, 0, i).class_id for i in range(10)} == {1}
    with pytest.raises(DataError, match="no class has more than 4 image"):
        sample_train_episode(by_class, 4, np.random.default_rng(0))


def test_negative_train_episodes_show_a_class_absent_from_the_query():
    # im00 holds classes 1 and 2; a negative episode for it may only take class 3's images as supports
    by_class = {1: ["im00", "im03", "im06"], 2: ["im00", "im04", "im07"], 3: ["im02", "im05", "im08"]}
    plain = [train_episode(by_class, 1, seed=3, index=i) for i in range(200)]
    assert plain == [train_episode(by_class, 1, seed=3, index=i, negative=0.0) for i in range(200)]
    mixed = [train_episode(by_class, 2, seed=3, index=i, negative=0.5) for i in range(200)]
    negatives = [e for e in mixed if e.query not in by_class[e.class_id]]
    assert 60 <= len(negatives) <= 140  # about half of 200
    for e in negatives:
        assert all(s in by_class[e.class_id] for s in e.supports) and len(set(e.supports)) == 2
        assert not any(e.query in ims for c, ims in by_class.items() if c == e.class_id)
    assert all(e.class_id == 3 for e in negatives if e.query == "im00")
    for e in mixed:
        if e not in negatives:  # positives are unchanged in kind: supports of the query's own class
            assert e.query in by_class[e.class_id] and e.query not in e.supports
    assert mixed == [train_episode(by_class, 2, seed=3, index=i, negative=0.5) for i in range(200)]


# ---------------------------------------------------------------------------------------------- files
def test_episode_files_are_byte_identical_and_round_trip(tmp_path):
    pairs = _pairs()
    a = sample_test_episodes(pairs, 20, 2, seed=11)
    b = sample_test_episodes(pairs, 20, 2, seed=11)
    write_episodes(tmp_path / "a.json", a, _meta(2, 11, 20))
    write_episodes(tmp_path / "b.json", b, dict(reversed(list(_meta(2, 11, 20).items()))))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    c = sample_test_episodes(pairs, 20, 2, seed=12)
    write_episodes(tmp_path / "c.json", c, _meta(2, 12, 20))
    assert (tmp_path / "c.json").read_bytes() != (tmp_path / "a.json").read_bytes()
    episodes, meta = read_episodes(tmp_path / "a.json")
    assert episodes == a and isinstance(episodes[0], Episode) and isinstance(episodes[0].supports, tuple)
    assert meta == _meta(2, 11, 20) and meta["convention"] == "consecutive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.json"]  # no temp files
    json.loads((tmp_path / "a.json").read_text())  # plain JSON


def test_bad_episode_files(tmp_path):
    episodes = sample_test_episodes(_pairs(), 4, 1, seed=0)
    with pytest.raises(DataError, match=r"lacks \['fingerprint'\]"):
        write_episodes(
            tmp_path / "x.json", episodes, {"benchmark": "b", "fold": 0, "shots": 1, "seed": 0, "n": 4}
        )
    with pytest.raises(DataError, match="meta says n=5 but there are 4 episodes"):
        write_episodes(tmp_path / "x.json", episodes, _meta(1, 0, 5))
    with pytest.raises(DataError, match="has 1 supports; meta says shots=2"):
        write_episodes(tmp_path / "x.json", episodes, _meta(2, 0, 4))
    with pytest.raises(DataError, match=r"episode file .*missing\.json not found"):
        read_episodes(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match=r"cannot read episode file .*bad\.json"):
        read_episodes(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"episodes": []}')
    with pytest.raises(DataError, match="not a dedn episode file"):
        read_episodes(tmp_path / "other.json")
    write_episodes(tmp_path / "ok.json", episodes, _meta(1, 0, 4))
    data = json.loads((tmp_path / "ok.json").read_text())
    data["episodes"][1] = ["im00"]
    (tmp_path / "broken.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="malformed episode entry"):
        read_episodes(tmp_path / "broken.json")


def test_validate_episodes():
    src = ArraySource()
    validate_episodes([Episode("im00", 1, ("im03",))], src, fingerprint="arrays-12")
    with pytest.raises(DataError, match="image 'im99' is not in"):
        validate_episodes([Episode("im00", 1, ("im99",))], src)
    with pytest.raises(DataError, match=r"class 7 does not exist; expected 1\.\.6"):
        validate_episodes([Episode("im00", 7, ("im03",))], src)
    with pytest.raises(DataError, match="fingerprint other"):
        validate_episodes([], src, fingerprint="other")


# ------------------------------------------------------------------------------------------- datasets
def test_binarize():
    label = np.array([[0, 1, 2], [255, 2, 4]], dtype=np.uint8)
    np.testing.assert_array_equal(binarize(label, 2), [[0, 0, 1], [255, 1, 0]])
    # sources with 255+ classes have no ignore value: 255 is then a class
    np.testing.assert_array_equal(
        binarize(label.astype(np.uint16), 255, ignore_index=None), [[0, 0, 0], [1, 0, 0]]
    )


def test_episode_dataset_items():
    src = ArraySource()
    episodes = [Episode("im01", 2, ("im04", "im07")), Episode("im02", 4, ("im00", "im05"))]
    ds = EpisodeDataset(src, episodes, StandInTransform())
    item = ds[0]
    assert item["query_image"].shape == (3, S, S) and item["query_image"].dtype == torch.float32
    assert item["support_images"].shape == (2, 3, S, S)
    assert item["support_masks"].shape == (2, S, S) and item["support_masks"].dtype == torch.int64
    assert item["class_id"] == 2 and item["index"] == 0
    raw = src.load_label("im01")  # 7 x 10, class 2 block, class 4 corner, ignore last row
    assert item["query_hw"].tolist() == [7, 10] and item["scaled_hw"].tolist() == [S, S]
    expected = np.where(raw == 2, 1, np.where(raw == 255, 255, 0))
    np.testing.assert_array_equal(item["query_label"].numpy(), expected)
    assert item["query_label"].dtype == torch.int64
    assert set(item["query_mask"].unique().tolist()) == {0, 1, 255}
    # class 4 (the corner) -> 1; the class-2 block of the query becomes background
    corner = ds[1]["query_label"]
    assert corner[0, 0] == 1 and corner[2, 4] == 0 and (corner[-1] == 255).all()
    assert (ds[1]["support_masks"] == 1).sum() > 0
    with pytest.raises(DataError, match="not in"):
        EpisodeDataset(src, [Episode("nope", 1, ("im00",))], StandInTransform())


def test_episode_dataset_with_the_real_test_transform():
    transforms = pytest.importorskip("dedn.data.transforms")
    ds = EpisodeDataset(ArraySource(), [Episode("im03", 1, ("im00",))], transforms.TestTransform(16))
    item = ds[0]
    assert item["query_image"].shape == (3, 16, 16) and item["query_mask"].shape == (16, 16)
    assert item["scaled_hw"].tolist() == [14, 16]  # im03 is 9 x 10: the longer side becomes 16
    assert set(item["query_mask"].unique().tolist()) <= {0, 1, 255}


def _class_ids_and_masks(loader) -> tuple[list[int], list[torch.Tensor]]:
    classes, masks = [], []
    for batch in loader:
        classes += batch["class_id"].tolist()
        masks += list(batch["query_mask"])
    return classes, masks


def test_data_loader_workers_do_not_change_episodes():
    src = ArraySource()
    episodes = sample_test_episodes(_pairs(), n=10, shots=1, seed=0)
    ds = EpisodeDataset(src, episodes, StandInTransform())
    runs = [
        _class_ids_and_masks(DataLoader(ds, batch_size=3, num_workers=w, collate_fn=collate_episodes))
        for w in (0, 2)
    ]
    assert runs[0][0] == runs[1][0] == [e.class_id for e in episodes]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))

    train = TrainEpisodeDataset(
        src, pairs_by_class(_pairs()), 1, seed=5, length=12, transform=StandInTrainTransform()
    )
    items = [list(DataLoader(train, batch_size=4, num_workers=w)) for w in (0, 2)]
    for b0, b1 in zip(*items, strict=True):
        for key in ("query_image", "query_mask", "support_masks", "class_id", "index"):
            assert torch.equal(b0[key], b1[key])
    # the episodes are exactly train_episode(seed, index)
    expected = [train_episode(pairs_by_class(_pairs()), 1, 5, i).class_id for i in range(12)]
    assert torch.cat([b["class_id"] for b in items[0]]).tolist() == expected


def test_train_episode_dataset_epochs():
    src = ArraySource()
    ds = TrainEpisodeDataset(
        src, pairs_by_class(_pairs()), 2, seed=1, length=5, transform=StandInTrainTransform()
    )
    assert [ds[i]["index"] for i in range(5)] == [0, 1, 2, 3, 4]
    epoch0 = ds[2]
    ds.set_epoch(3)
    assert ds[2]["index"] == 17
    ds.set_epoch(0)
    again = ds[2]
    assert torch.equal(again["query_image"], epoch0["query_image"])
    assert torch.equal(again["support_masks"], epoch0["support_masks"])
    assert again["support_images"].shape == (2, 3, S, S)
    with pytest.raises(DataError, match="no class has more than 5"):
        TrainEpisodeDataset(
            src, pairs_by_class(_pairs()), 5, seed=1, length=5, transform=StandInTrainTransform()
        )


def test_collate_keeps_original_size_labels_as_a_list():
    ds = EpisodeDataset(ArraySource(), [Episode("im00", 1, ("im03",)), Episode("im01", 2, ("im04",))],
                        StandInTransform())  # fmt: skip
    batch = collate_episodes([ds[0], ds[1]])
    assert batch["query_image"].shape == (2, 3, S, S) and batch["support_masks"].shape == (2, 1, S, S)
    assert [t.shape for t in batch["query_label"]] == [(6, 10), (7, 10)]
    assert batch["class_id"].tolist() == [1, 2] and batch["query_hw"].tolist() == [[6, 10], [7, 10]]
