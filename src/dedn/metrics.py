"""The few-shot segmentation metrics: per-class foreground mIoU and FB-IoU (see shared PROTOCOL.md).

One class serves training-time validation, evaluation and the tests. Its state is a handful of integer
pixel counts, so it can be merged, saved in a checkpoint and summed across processes exactly.

Definitions (PFENet / BAM / HSNet convention), pixels whose *label* is 255 excluded from both prediction
and target:

* per novel class ``c``: foreground intersection ``I_c`` and union ``U_c`` summed over all episodes of
  ``c``; ``miou`` = mean over the fold's classes of ``I_c / U_c``;
* ``fg_iou`` / ``bg_iou``: the foreground (background) intersection over union with both counts summed over
  all episodes of the fold; ``fbiou`` = their mean.

All values returned by :meth:`FewShotIoU.compute` are **fractions in [0, 1]** (multiply by 100 to print
percent, as papers do). A value that is undefined (no pixel in its union) is ``None``, which stays valid
JSON.

Example::

    metric = FewShotIoU(class_ids=[1, 2, 3, 4, 5])
    for batch in loader:
        metric.update(prediction, batch["query_label"], batch["class_id"])
    metric.all_reduce()          # under torch.distributed; a no-op otherwise
    result = metric.compute()    # {"miou": 0.61, "fbiou": 0.74, ...}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dedn.errors import ConfigError

__all__ = ["FewShotIoU", "aggregate_seeds"]

# order of the scalar totals in the state vector
_TOTALS = ("fg_intersection", "fg_union", "bg_intersection", "bg_union", "episodes")


class FewShotIoU:
    """Accumulates few-shot segmentation IoU counts over episodes.

    ``class_ids``: the classes of the fold (e.g. the 5 novel classes of a PASCAL-5i fold). Updating with a
    class outside this list is an error (it would silently change which classes the mean runs over).

    State (int64 counts; on the CPU until the first :meth:`update` after construction or :meth:`reset`
    moves it to that update's device, where it stays; moving is exact): per class the
    foreground intersection and union and the number of episodes; over all episodes the foreground and
    background intersections and unions and the episode count.

    A class that was never sampled (or whose union is empty) has an undefined IoU: it is reported as
    ``None`` in ``class_iou``, listed in ``missing_classes``, and by default left out of ``miou`` (the mean
    over the classes that were scored); ``compute(missing="zero")`` averages it in as 0 instead, as the
    evaluation code of PFENet, BAM and HSNet does. ``compute()`` emits a ``RuntimeWarning`` either way,
    since such a fold's mIoU is not comparable with a full one.
    """

    def __init__(self, class_ids: Iterable[int], ignore_index: int = 255):
        ids = [int(c) for c in class_ids]
        if not ids:
            raise ConfigError("FewShotIoU needs at least one class id")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"FewShotIoU: class ids must be distinct, got {ids}")
        self.class_ids: list[int] = ids
        self.ignore_index = int(ignore_index)
        self._index = {c: i for i, c in enumerate(ids)}
        self.reset()

    # -- state ----------------------------------------------------------------------------------------------
    def reset(self, device: torch.device | str | None = None) -> None:
        """Zero all counts (kept on ``device``, default: the current device or the CPU)."""
        if device is None:
            device = getattr(self, "class_intersection", torch.empty(0)).device
        n = len(self.class_ids)
        self.class_intersection = torch.zeros(n, dtype=torch.int64, device=device)
        self.class_union = torch.zeros(n, dtype=torch.int64, device=device)
        self.class_episodes = torch.zeros(n, dtype=torch.int64, device=device)
        self.totals = torch.zeros(len(_TOTALS), dtype=torch.int64, device=device)
        self._placed = False

    @property
    def device(self) -> torch.device:
        return self.totals.device

    def to(self, device: torch.device | str) -> FewShotIoU:
        """Move the state to ``device`` (counts are kept exactly)."""
        self.class_intersection = self.class_intersection.to(device)
        self.class_union = self.class_union.to(device)
        self.class_episodes = self.class_episodes.to(device)
        self.totals = self.totals.to(device)
        return self

    def _flat(self) -> Tensor:
        return torch.cat([self.class_intersection, self.class_union, self.class_episodes, self.totals])

    def _set_flat(self, flat: Tensor) -> None:
        n = len(self.class_ids)
        self.class_intersection, self.class_union, self.class_episodes, self.totals = (
            t.clone() for t in flat.split([n, n, n, len(_TOTALS)])
        )

    # -- accumulation ---------------------------------------------------------------------------------------
    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray, class_id: Any) -> None:
        """Add episodes.

        ``pred``: (H, W) or (B, H, W) with values in {0, 1} (or bool); ``target``: same shape with values in
        {0, 1, ignore_index}; ``class_id``: the episode class, an int (for every episode of the batch) or a
        sequence / tensor of B ints.
        """
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(
                f"FewShotIoU.update: prediction shape {tuple(pred.shape)} != target shape "
                f"{tuple(target.shape)}"
            )
        if pred.dim() == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        elif pred.dim() != 3:
            raise ValueError(
                f"FewShotIoU.update: expected (H, W) or (B, H, W) masks, got {tuple(pred.shape)}"
            )
        batch = pred.shape[0]
        indices = self._class_indices(class_id, batch)
        if not self._placed:
            # state follows the data: a metric created on the CPU works unchanged for GPU predictions
            self.to(pred.device)
            self._placed = True
        target = target.to(self.device)
        pred = pred.to(self.device)
        self._check_values(pred, target)

        # four counts per mask give all of them: on the valid (not ignored) pixels prediction and target
        # are 0 or 1, so background intersection = valid - foreground union and background union =
        # valid - foreground intersection (exact integers, as counting each set would give)
        valid = target != self.ignore_index
        pred_fg = (pred == 1) & valid
        true_fg = target == 1
        fg_inter = (pred_fg & true_fg).flatten(1).sum(1)  # (B,)
        valid_n = valid.flatten(1).sum(1)
        fg_union = pred_fg.flatten(1).sum(1) + true_fg.flatten(1).sum(1) - fg_inter
        bg_inter = valid_n - fg_union
        bg_union = valid_n - fg_inter

        index = torch.as_tensor(indices, dtype=torch.int64, device=self.device)
        self.class_intersection.index_add_(0, index, fg_inter)
        self.class_union.index_add_(0, index, fg_union)
        self.class_episodes.index_add_(0, index, torch.ones_like(index))
        self.totals += torch.stack(
            [fg_inter.sum(), fg_union.sum(), bg_inter.sum(), bg_union.sum(), fg_inter.new_tensor(batch)]
        )

    def _class_indices(self, class_id: Any, batch: int) -> list[int]:
        if isinstance(class_id, Tensor):
            ids = [int(c) for c in class_id.flatten().tolist()]
        elif isinstance(class_id, (int, np.integer)):
            ids = [int(class_id)] * batch
        elif isinstance(class_id, (Sequence, np.ndarray)):
            ids = [int(c) for c in class_id]
        else:
            raise ValueError(
                f"FewShotIoU.update: class_id must be an int or a sequence of ints, got {class_id!r}"
            )
        if len(ids) == 1 and batch > 1:
            ids = ids * batch
        if len(ids) != batch:
            raise ValueError(f"FewShotIoU.update: {len(ids)} class ids for a batch of {batch} masks")
        unknown = sorted({c for c in ids if c not in self._index})
        if unknown:
            raise ConfigError(
                f"FewShotIoU.update: class(es) {unknown} not among the metric's classes {self.class_ids}"
            )
        return [self._index[c] for c in ids]

    def _check_values(self, pred: Tensor, target: Tensor) -> None:
        # one min/max pass each in the common case; the slower search only to name the bad values
        if pred.dtype != torch.bool and pred.numel() and not (pred.min() >= 0 and pred.max() <= 1):
            bad = torch.unique(pred[(pred != 0) & (pred != 1)])[:5].tolist()
            raise ValueError(f"FewShotIoU.update: prediction values must be 0 or 1, found {bad}")
        if not target.numel():
            return
        low, high = torch.aminmax(target)
        if low >= 0 and (
            high <= 1 or (high == self.ignore_index and not ((target > 1) & (target != high)).any())
        ):
            return
        bad_mask = (target != 0) & (target != 1) & (target != self.ignore_index)
        if bool(bad_mask.any()):
            bad = torch.unique(target[bad_mask])[:5].tolist()
            raise ValueError(
                f"FewShotIoU.update: target values must be 0, 1 or {self.ignore_index} (ignore), "
                f"found {bad}; convert labels to the episode's binary mask first"
            )

    # -- combination ----------------------------------------------------------------------------------------
    def merge(self, other: FewShotIoU) -> FewShotIoU:
        """Add the counts of ``other`` (same classes and ignore index) to this metric; returns self."""
        if other.class_ids != self.class_ids or other.ignore_index != self.ignore_index:
            raise ConfigError(
                f"FewShotIoU.merge: classes {other.class_ids} (ignore {other.ignore_index}) do not match "
                f"{self.class_ids} (ignore {self.ignore_index})"
            )
        self._set_flat(self._flat() + other._flat().to(self.device))
        return self

    def all_reduce(self) -> FewShotIoU:
        """Sum the counts over all processes of the default ``torch.distributed`` group (no-op without one).

        Call it exactly once, after the last update and before :meth:`compute`, on every process; calling
        it twice would count the other processes' episodes twice. Every process must use the same classes.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        flat = self._flat()
        backend = str(torch.distributed.get_backend()).lower()
        if "nccl" in backend and flat.device.type != "cuda":
            # NCCL reduces CUDA tensors only; a process that saw no episode still holds CPU state
            flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        self._set_flat(flat.to(self.device))
        return self

    # -- results --------------------------------------------------------------------------------------------
    def compute(self, missing: str = "skip") -> dict[str, Any]:
        """The metrics as fractions in [0, 1] (``None`` where undefined).

        ``missing``: what a class without a defined IoU does to ``miou``: "skip" (left out) or "zero"
        (counted as 0). Keys: ``miou``, ``fbiou``, ``fg_iou``, ``bg_iou``, ``class_iou`` {class id: IoU or
        None}, ``class_episodes`` {class id: count}, ``missing_classes`` (classes without a defined IoU),
        ``episodes``.
        """
        inter = self.class_intersection.cpu().tolist()
        union = self.class_union.cpu().tolist()
        episodes = self.class_episodes.cpu().tolist()
        fg_i, fg_u, bg_i, bg_u, n = self.totals.cpu().tolist()
        class_iou: dict[int, float | None] = {
            c: (inter[i] / union[i] if union[i] > 0 else None) for i, c in enumerate(self.class_ids)
        }
        if missing not in ("skip", "zero"):
            raise ConfigError(f"FewShotIoU.compute: missing = {missing!r}; expected 'skip' or 'zero'")
        absent = [c for c, v in class_iou.items() if v is None]
        scored = [v for v in class_iou.values() if v is not None]
        if absent and n > 0:
            how = (
                f"mIoU is the mean over the other {len(scored)} of {len(self.class_ids)} classes"
                if missing == "skip"
                else f"they count as IoU 0 in the mean over all {len(self.class_ids)} classes"
            )
            warnings.warn(
                f"FewShotIoU: no scored pixels for class(es) {absent}; {how}", RuntimeWarning, stacklevel=2
            )
        if missing == "zero" and scored:
            scored = scored + [0.0] * len(absent)
        fg_iou = fg_i / fg_u if fg_u > 0 else None
        bg_iou = bg_i / bg_u if bg_u > 0 else None
        fbiou = (fg_iou + bg_iou) / 2 if fg_iou is not None and bg_iou is not None else None
        return {
            "miou": sum(scored) / len(scored) if scored else None,
            "fbiou": fbiou,
            "fg_iou": fg_iou,
            "bg_iou": bg_iou,
            "class_iou": class_iou,
            "class_episodes": dict(zip(self.class_ids, episodes, strict=True)),
            "missing_classes": absent,
            "episodes": int(n),
        }

    def state_dict(self) -> dict[str, Any]:
        """Counts as CPU tensors plus the configuration (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "class_ids": list(self.class_ids),
            "ignore_index": self.ignore_index,
            "class_intersection": self.class_intersection.cpu(),
            "class_union": self.class_union.cpu(),
            "class_episodes": self.class_episodes.cpu(),
            "totals": self.totals.cpu(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counts saved by :meth:`state_dict`; the classes must match (ConfigError otherwise)."""
        class_ids = [int(c) for c in state.get("class_ids", [])]
        if class_ids != self.class_ids or int(state.get("ignore_index", -1)) != self.ignore_index:
            raise ConfigError(
                f"FewShotIoU.load_state_dict: saved classes {class_ids} (ignore {state.get('ignore_index')}) "
                f"do not match {self.class_ids} (ignore {self.ignore_index})"
            )
        n = len(self.class_ids)
        expected = {"class_intersection": n, "class_union": n, "class_episodes": n, "totals": len(_TOTALS)}
        for key, size in expected.items():
            value = state.get(key)
            if not isinstance(value, Tensor) or value.shape != (size,):
                raise ConfigError(f"FewShotIoU.load_state_dict: {key!r} must be a tensor of {size} counts")
        device = self.device
        for key in expected:
            setattr(self, key, state[key].to(device=device, dtype=torch.int64).clone())


def _mean_std(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=0)), "n": len(values)}


def aggregate_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of :meth:`FewShotIoU.compute` results.

    The std is the *population* std (``ddof=0``, numpy's default, as the FSS literature computes it over
    5-10 seeds). Returns ``{"miou": {"mean", "std", "n"}, "fbiou": ..., "fg_iou": ..., "bg_iou": ...,
    "class_iou": {class id: {"mean", "std", "n"}}, "seeds": len(results)}``; a value that is ``None`` in
    a seed's result is left out of that entry (``n`` counts the seeds that had it). Class keys may be ints
    or strings (results read back from JSON); they come back as ints where they parse as ints.
    """
    if not results:
        raise ValueError("aggregate_seeds: no results to aggregate")
    out: dict[str, Any] = {}
    for key in ("miou", "fbiou", "fg_iou", "bg_iou"):
        out[key] = _mean_std([float(r[key]) for r in results if r.get(key) is not None])
    per_class: dict[Any, list[float]] = {}
    for result in results:
        for cls, value in (result.get("class_iou") or {}).items():
            key = int(cls) if isinstance(cls, str) and cls.lstrip("-").isdigit() else cls
            bucket = per_class.setdefault(key, [])
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                bucket.append(float(value))
    out["class_iou"] = {cls: _mean_std(values) for cls, values in per_class.items()}
    out["seeds"] = len(results)
    return out
