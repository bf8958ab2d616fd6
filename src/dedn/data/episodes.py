"""Few-shot episodes: seeded sampling, episode files, and the torch datasets that load them.

Test episodes are drawn once from a seed and written to a JSON file, so evaluation never depends on the
number of workers, the batch size or the loop structure (a fault of several reference code bases):

- the query pairs are visited in one seeded permutation, cycled until ``n`` episodes exist;
- the episode class is the query pair's class;
- the K supports are distinct images, other than the query, that have an eligible pair of that class.

Training episode ``i`` is a pure function of ``(seed, i)`` (:func:`train_episode`), so a resumed or
multi-process run sees exactly the episodes of an uninterrupted single-process one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dedn.data.base import IGNORE_INDEX, SegmentationSource
from dedn.data.index import ignore_value
from dedn.data.protocol import Pair, pairs_by_class
from dedn.errors import DataError
from dedn.utils.io import atomic_write_text

_FORMAT = "dedn-episodes"
_VERSION = 1

#: keys every episode file's meta must carry, so a result can always be traced to its episodes
REQUIRED_META = ("benchmark", "fold", "shots", "seed", "n", "fingerprint")

#: test-time transform: (image (H,W,3) uint8, label (H,W) uint8) -> (image (3,S,S), label (S,S), scaled_hw)
TestTransformFn = Callable[[np.ndarray, np.ndarray], tuple[Any, Any, Sequence[int]]]
#: train-time transform: (image, label, rng) -> (image (3,S,S), label (S,S))
TrainTransformFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[Any, Any]]


@dataclass(frozen=True)
class Episode:
    """One episode: segment ``class_id`` in image ``query`` given the masks of the ``supports``."""

    query: str
    class_id: int
    supports: tuple[str, ...]


def _choose_others(images: Sequence[str], skip: int, k: int, rng: np.random.Generator) -> tuple[str, ...]:
    """``k`` distinct entries of ``images`` other than position ``skip`` (-1: none), in drawn order."""
    m = len(images) - (1 if skip >= 0 else 0)
    picks = rng.choice(m, size=k, replace=False)
    return tuple(images[int(j) + (1 if 0 <= skip <= j else 0)] for j in picks)


def _class_label(class_id: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 1 <= class_id <= len(class_names):
        return f"class {class_id} ({class_names[class_id - 1]})"
    return f"class {class_id}"


def sample_test_episodes(
    pairs: Sequence[Pair],
    n: int,
    shots: int,
    seed: int,
    support_pairs: Sequence[Pair] | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Episode]:
    """``n`` test episodes from ``pairs`` (the fold's eligible novel pairs), fixed by ``seed``.

    Supports come from ``support_pairs`` (default: ``pairs``). A class with fewer than ``shots`` other images
    is an error naming the class and the counts.
    """
    pairs = list(pairs)
    if not pairs:
        raise DataError("no test pairs to draw episodes from (is the fold empty at this resolution?)")
    if n < 1 or shots < 1:
        raise DataError(f"n={n}, shots={shots}; expected n >= 1 and shots >= 1")
    pool = pairs_by_class(support_pairs if support_pairs is not None else pairs)
    position = {c: {image_id: j for j, image_id in enumerate(ims)} for c, ims in pool.items()}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    episodes = []
    for i in range(n):
        pair = pairs[int(order[i % len(pairs)])]
        images = pool.get(pair.class_id, [])
        skip = position.get(pair.class_id, {}).get(pair.image_id, -1)
        others = len(images) - (1 if skip >= 0 else 0)
        if others < shots:
            raise DataError(
                f"{_class_label(pair.class_id, class_names)} has {others} image(s) with an eligible pair "
                f"besides the query {pair.image_id!r}, but {shots} shot(s) were requested"
            )
        episodes.append(Episode(pair.image_id, pair.class_id, _choose_others(images, skip, shots, rng)))
    return episodes


def add_ways(
    episodes: Sequence[Episode],
    pairs: Sequence[Pair],
    ways: int,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> list[tuple[Episode, ...]]:
    """N-way episodes (PANet's protocol, Wang et al., ICCV 2019): each one-way episode of ``episodes`` is
    the first way; ``ways - 1`` other classes of ``pairs`` (the fold's novel pairs) are drawn for it,
    uniformly and distinct, each with K supports of its own (images with an eligible pair of that class,
    never the query). The query need not show the other classes: where it does, their pixels are their
    class's target; where it does not, every pixel given to them is a false positive.

    Way ``w`` of episode ``j`` is a pure function of ``(seed, j)`` and the pairs, so the N-way episodes of a
    one-way episode file are always the same, and their first ways are exactly the one-way episodes.
    """
    if ways < 1:
        raise DataError(f"ways={ways}; expected at least 1")
    pool = pairs_by_class(pairs)
    out = []
    for j, first in enumerate(episodes):
        shots = len(first.supports)
        # classes with K images besides the query (the query itself may hold a pair of that class)
        usable = [
            c for c, ims in pool.items() if c != first.class_id and len(set(ims) - {first.query}) >= shots
        ]
        if len(usable) < ways - 1:
            raise DataError(
                f"{ways}-way episodes need {ways - 1} other class(es) with {shots} image(s) besides the "
                f"query {first.query!r} of {_class_label(first.class_id, class_names)}; "
                f"{len(usable)} have them"
            )
        rng = np.random.default_rng([int(seed), j, ways])
        chosen = [usable[int(i)] for i in rng.choice(len(usable), size=ways - 1, replace=False)]
        episode = [first]
        for c in chosen:
            images = pool[c]
            skip = images.index(first.query) if first.query in images else -1
            episode.append(Episode(first.query, c, _choose_others(images, skip, shots, rng)))
        out.append(tuple(episode))
    return out


def sample_train_episode(
    pairs_by_class: Mapping[int, Sequence[str]],
    shots: int,
    rng: np.random.Generator,
    negative: float = 0.0,
) -> Episode:
    """One training episode: a query pair uniformly over all pairs, then ``shots`` other images of its class.

    Classes with at most ``shots`` images cannot form an episode and are left out of the draw. With
    probability ``negative`` the episode is instead a *negative* one: the supports show a class that the
    query image has no pair of, so the target is (nearly) all background and the episode can only be
    solved by looking at the supports. ``negative=0`` draws exactly the same episodes as before it existed.
    """
    if shots < 1:
        raise DataError(f"shots={shots}; expected shots >= 1")
    usable = [(c, ims) for c, ims in sorted(pairs_by_class.items()) if len(ims) > shots]
    if not usable:
        sizes = {c: len(ims) for c, ims in sorted(pairs_by_class.items())}
        raise DataError(
            f"no class has more than {shots} image(s) (images per class: {sizes}); cannot form "
            f"{shots}-shot training episodes"
        )
    sizes = np.array([len(ims) for _, ims in usable])
    k = int(rng.integers(int(sizes.sum())))
    which = int(np.searchsorted(np.cumsum(sizes), k, side="right"))
    class_id, images = usable[which]
    position = k - int(sizes[:which].sum())
    query = images[position]
    if negative > 0 and rng.random() < negative:
        absent = [(c, ims) for c, ims in usable if query not in ims]
        if absent:
            other_class, others = absent[int(rng.integers(len(absent)))]
            return Episode(query, other_class, _choose_others(others, -1, shots, rng))
    return Episode(query, class_id, _choose_others(images, position, shots, rng))


def _train_rng(seed: int, index: int) -> np.random.Generator:
    # a SeedSequence from (seed, index) gives independent, reproducible streams per episode
    return np.random.default_rng([int(seed), int(index)])


def train_episode(
    split_pairs_by_class: Mapping[int, Sequence[str]],
    shots: int,
    seed: int,
    index: int,
    negative: float = 0.0,
) -> Episode:
    """Training episode number ``index``: a pure function of ``(seed, index)`` and the pairs."""
    return sample_train_episode(split_pairs_by_class, shots, _train_rng(seed, index), negative)


def episode_meta(
    benchmark: str, fold: int | None, shots: int, seed: int, n: int, fingerprint: str, **extra: Any
) -> dict[str, Any]:
    """The meta block of an episode file (extra keys, e.g. ``convention`` or ``protocol``, are kept)."""
    return {"benchmark": benchmark, "fold": fold, "shots": shots, "seed": seed, "n": n,
            "fingerprint": fingerprint, **extra}  # fmt: skip


def _check_meta(meta: Mapping[str, Any], episodes: Sequence[Episode], where: str) -> None:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise DataError(f"{where}: episode meta lacks {missing}; expected keys {list(REQUIRED_META)}")
    if meta["n"] != len(episodes):
        raise DataError(f"{where}: meta says n={meta['n']} but there are {len(episodes)} episodes")
    wrong = [i for i, e in enumerate(episodes) if len(e.supports) != meta["shots"]]
    if wrong:
        raise DataError(
            f"{where}: episode {wrong[0]} has {len(episodes[wrong[0]].supports)} supports; meta says "
            f"shots={meta['shots']}"
        )


def write_episodes(path: str | os.PathLike, episodes: Sequence[Episode], meta: Mapping[str, Any]) -> Path:
    """Write episodes and their meta to ``path`` atomically, one episode per line.

    The output is byte-identical for identical input (meta keys sorted, fixed formatting).
    """
    _check_meta(meta, episodes, str(path))
    header = {"format": _FORMAT, "version": _VERSION, "meta": dict(sorted(meta.items()))}
    lines = [json.dumps(header, sort_keys=False)[:-1] + ', "episodes": [']
    rows = [json.dumps([e.query, e.class_id, list(e.supports)]) for e in episodes]
    lines += [f"  {r}," for r in rows[:-1]] + [f"  {r}" for r in rows[-1:]]
    lines.append("]}")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_episodes(path: str | os.PathLike) -> tuple[list[Episode], dict[str, Any]]:
    """Episodes and meta from a file written by :func:`write_episodes` (format and counts checked)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"episode file {path} not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read episode file {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise DataError(f"{path} is not a dedn episode file (expected format {_FORMAT!r})")
    if data.get("version") != _VERSION:
        raise DataError(f"{path}: episode file version {data.get('version')}; expected {_VERSION}")
    try:
        episodes = [Episode(str(q), int(c), tuple(str(s) for s in sup)) for q, c, sup in data["episodes"]]
        meta = dict(data["meta"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{path}: malformed episode entry ({e}); expected [query, class_id, [supports]]"
        ) from None
    _check_meta(meta, episodes, str(path))
    return episodes, meta


def validate_episodes(
    episodes: Iterable[Episode], source: SegmentationSource, fingerprint: str | None = None
) -> None:
    """Check that every image of ``episodes`` is in ``source`` and every class exists in it.

    With ``fingerprint`` (an episode file's meta), also that the source is the one the episodes were drawn
    from.
    """
    if fingerprint is not None and fingerprint != source.fingerprint():
        raise DataError(
            f"episodes were drawn from a source with fingerprint {fingerprint}, but {source!r} has "
            f"{source.fingerprint()}; the data changed since the episodes were written"
        )
    known = set(source.ids)
    for i, e in enumerate(episodes):
        if not 1 <= e.class_id <= source.num_classes:
            raise DataError(
                f"episode {i}: class {e.class_id} does not exist; expected 1..{source.num_classes}"
            )
        for image_id in (e.query, *e.supports):
            if image_id not in known:
                raise DataError(f"episode {i}: image {image_id!r} is not in {source!r}")


def binarize(label: np.ndarray, class_id: int, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """Binary episode mask: ``class_id`` -> 1, other classes -> 0, ``ignore_index`` stays 255 (uint8)."""
    out = np.zeros(label.shape, dtype=np.uint8)
    if ignore_index is not None:
        out[label == ignore_index] = IGNORE_INDEX
    out[label == class_id] = 1
    return out


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x).to(dtype)


class EpisodeDataset(Dataset):
    """Loads test (or validation) episodes; item ``i`` is episode ``i``.

    Keys: ``query_image`` (3,S,S) float32, ``query_mask`` (S,S) int64 in {0,1,255}, ``support_images``
    (K,3,S,S), ``support_masks`` (K,S,S), ``class_id``, ``index``, and for scoring at the original size
    ``query_label`` (H,W) int64 in {0,1,255}, ``query_hw`` (H,W) and ``scaled_hw`` (h,w) as int64 tensors.
    Use :func:`collate_episodes` to batch episodes whose original sizes differ.
    """

    def __init__(
        self,
        source: SegmentationSource,
        episodes: Sequence[Episode],
        transform_query: TestTransformFn,
        transform_support: TestTransformFn | None = None,
    ):
        self.source = source
        self.episodes = list(episodes)
        validate_episodes(self.episodes, source)
        self.transform_query = transform_query
        self.transform_support = transform_support if transform_support is not None else transform_query
        self._ignore = ignore_value(source)

    def __len__(self) -> int:
        return len(self.episodes)

    def _load(self, image_id: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.source.load_pair(image_id)
        return image, binarize(label, class_id, self._ignore)

    def __getitem__(self, index: int) -> dict[str, Any]:
        episode = self.episodes[index]
        image, label = self._load(episode.query, episode.class_id)
        query_image, query_mask, scaled_hw = self.transform_query(image, label)
        support_images, support_masks = [], []
        for support in episode.supports:
            s_image, s_label = self._load(support, episode.class_id)
            s_image_t, s_mask_t, _ = self.transform_support(s_image, s_label)
            support_images.append(_as_tensor(s_image_t, torch.float32))
            support_masks.append(_as_tensor(s_mask_t, torch.int64))
        return {
            "query_image": _as_tensor(query_image, torch.float32),  # (3, S, S)
            "query_mask": _as_tensor(query_mask, torch.int64),  # (S, S)
            "support_images": torch.stack(support_images),  # (K, 3, S, S)
            "support_masks": torch.stack(support_masks),  # (K, S, S)
            "class_id": episode.class_id,
            "index": index,
            "query_label": torch.from_numpy(label.astype(np.int64)),  # (H, W) original size
            "query_hw": torch.tensor(label.shape[:2], dtype=torch.int64),
            "scaled_hw": torch.tensor([int(v) for v in scaled_hw], dtype=torch.int64),
        }


class TrainEpisodeDataset(Dataset):
    """Training episodes ``epoch * length + i`` for ``i < length``, each a pure function of (seed, number).

    The same generator that draws the episode then drives the augmentation, so an item is reproducible
    whatever the worker count. Call :meth:`set_epoch` before each epoch's iterator is created.
    Transform interface: ``transform(image, label, rng) -> (image (3,S,S), label (S,S))``.
    Keys: ``query_image``, ``query_mask``, ``support_images``, ``support_masks``, ``class_id``, ``index``
    (the global episode number).
    """

    def __init__(
        self,
        source: SegmentationSource,
        pairs_by_class: Mapping[int, Sequence[str]],
        shots: int,
        seed: int,
        length: int,
        transform: TrainTransformFn,
        negative: float = 0.0,
    ):
        if length < 1:
            raise DataError(f"length={length}; expected at least 1 episode per epoch")
        self.source = source
        self.pairs_by_class = {int(c): list(ims) for c, ims in sorted(pairs_by_class.items())}
        self.shots = shots
        self.seed = seed
        self.length = length
        self.transform = transform
        self.negative = negative
        self.epoch = 0
        self._ignore = ignore_value(source)
        train_episode(self.pairs_by_class, shots, seed, 0)  # fail now, not inside a worker

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        number = self.epoch * self.length + index
        rng = _train_rng(self.seed, number)
        episode = sample_train_episode(self.pairs_by_class, self.shots, rng, self.negative)
        images, masks = [], []
        for image_id in (episode.query, *episode.supports):
            image, label = self.source.load_pair(image_id)
            image_t, mask_t = self.transform(image, binarize(label, episode.class_id, self._ignore), rng)
            images.append(_as_tensor(image_t, torch.float32))
            masks.append(_as_tensor(mask_t, torch.int64))
        return {
            "query_image": images[0],
            "query_mask": masks[0],
            "support_images": torch.stack(images[1:]),
            "support_masks": torch.stack(masks[1:]),
            "class_id": episode.class_id,
            "index": number,
        }


def collate_episodes(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a list of episode items; ``query_label`` (sizes differ between images) stays a list."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key == "query_label":
            out[key] = values
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        else:
            out[key] = torch.tensor(values)
    return out
