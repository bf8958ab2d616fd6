"""FewShotIoU and aggregate_seeds on hand-made masks with hand-computed values."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dedn.errors import ConfigError
from dedn.metrics import FewShotIoU, aggregate_seeds

T = torch.tensor

# Three hand-made episodes; counts worked out by hand in the comments (255 = ignore).
# 1) class 1: fg I = 1 {(0,0)}, fg U = 3 {(0,0),(0,1),(1,0)}; the ignored pixel (1,1) counts nowhere;
#    bg I = 2 {(0,2),(1,2)}, bg U = 4 {(0,1),(0,2),(1,0),(1,2)}
EP1 = (T([[1, 1, 0], [0, 0, 0]]), T([[1, 0, 0], [1, 255, 0]]), 1)
# 2) class 2: fg I = 2, fg U = 3; bg I = 1 {(0,0)}, bg U = 2 {(0,0),(1,1)}
EP2 = (T([[0, 1], [1, 1]]), T([[0, 1], [1, 0]]), 2)
# 3) class 1: fg I = 2, fg U = 4; bg I = 0, bg U = 2
EP3 = (T([[1, 1], [1, 1]]), T([[1, 1], [0, 0]]), 1)


def hand_metric() -> FewShotIoU:
    metric = FewShotIoU([1, 2])
    for pred, target, cls in (EP1, EP2, EP3):
        metric.update(pred, target, cls)
    return metric


def test_exact_values_on_hand_made_masks():
    result = hand_metric().compute()
    # class 1: I = 1 + 2, U = 3 + 4; class 2: 2 / 3
    assert result["class_iou"] == {1: pytest.approx(3 / 7), 2: pytest.approx(2 / 3)}
    assert result["miou"] == pytest.approx((3 / 7 + 2 / 3) / 2)
    assert result["fg_iou"] == pytest.approx(5 / 10)
    assert result["bg_iou"] == pytest.approx(3 / 8)
    assert result["fbiou"] == pytest.approx((5 / 10 + 3 / 8) / 2)
    assert result["episodes"] == 3
    assert result["class_episodes"] == {1: 2, 2: 1}
    assert result["missing_classes"] == []


def test_empty_prediction():
    metric = FewShotIoU([7])
    target = torch.zeros(4, 4, dtype=torch.int64)
    target[:2, :2] = 1
    metric.update(torch.zeros(4, 4, dtype=torch.int64), target, 7)
    result = metric.compute()
    assert result["class_iou"][7] == 0.0 and result["miou"] == 0.0
    assert result["fg_iou"] == 0.0
    assert result["bg_iou"] == pytest.approx(12 / 16)
    assert result["fbiou"] == pytest.approx(0.375)


def test_all_ignore_target_contributes_nothing():
    metric = hand_metric()
    before = metric.compute()
    metric.update(torch.ones(5, 5, dtype=torch.int64), torch.full((5, 5), 255), 2)
    after = metric.compute()
    for key in ("miou", "fbiou", "fg_iou", "bg_iou", "class_iou"):
        assert after[key] == before[key]
    # it was evaluated, so it counts as an episode, but it adds no pixel to any count
    assert after["episodes"] == before["episodes"] + 1


def test_class_never_sampled_is_left_out_with_a_warning():
    metric = FewShotIoU([1, 2, 3])
    for pred, target, cls in (EP1, EP2, EP3):
        metric.update(pred, target, cls)
    with pytest.warns(RuntimeWarning, match=r"\[3\]"):
        result = metric.compute()
    assert result["class_iou"][3] is None
    assert result["missing_classes"] == [3]
    assert result["miou"] == pytest.approx((3 / 7 + 2 / 3) / 2)


def test_nothing_accumulated_gives_none_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = FewShotIoU([1, 2]).compute()
    assert result["miou"] is None and result["fbiou"] is None and result["episodes"] == 0


def random_episodes(n: int, seed: int, classes=(1, 2, 3), hw=(6, 7)):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, 2, (n, *hw), generator=g)
    target = torch.randint(0, 3, (n, *hw), generator=g)
    target[target == 2] = 255
    cls = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    return pred, target, cls


def assert_same_state(a: FewShotIoU, b: FewShotIoU) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


def test_batched_updates_equal_one_by_one():
    pred, target, cls = random_episodes(6, seed=0)
    batched, single, as_list = FewShotIoU([1, 2, 3]), FewShotIoU([1, 2, 3]), FewShotIoU([1, 2, 3])
    batched.update(pred, target, cls)
    as_list.update(pred.numpy(), target.numpy(), cls.tolist())
    for i in range(6):
        single.update(pred[i], target[i], int(cls[i]))
    assert_same_state(batched, single)
    assert_same_state(as_list, single)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # seed 0 never draws class 3
        assert batched.compute()["episodes"] == 6


def test_one_int_class_for_a_whole_batch_and_bool_predictions():
    pred, target, _ = random_episodes(3, seed=1)
    a, b = FewShotIoU([4]), FewShotIoU([4])
    a.update(pred.bool(), target, 4)
    b.update(pred, target, [4, 4, 4])
    assert_same_state(a, b)


def test_merge_equals_single_accumulation():
    pred, target, cls = random_episodes(10, seed=2)
    whole, first, second = FewShotIoU([1, 2, 3]), FewShotIoU([1, 2, 3]), FewShotIoU([1, 2, 3])
    whole.update(pred, target, cls)
    first.update(pred[:4], target[:4], cls[:4])
    second.update(pred[4:], target[4:], cls[4:])
    assert_same_state(first.merge(second), whole)
    assert first.compute() == whole.compute()
    with pytest.raises(ConfigError, match="do not match"):
        first.merge(FewShotIoU([1, 2]))


def test_state_dict_round_trip_through_a_file(tmp_path):
    metric = hand_metric()
    torch.save(metric.state_dict(), tmp_path / "metric.pt")
    restored = FewShotIoU([1, 2])
    restored.load_state_dict(torch.load(tmp_path / "metric.pt", weights_only=True))
    assert_same_state(restored, metric)
    assert restored.compute() == metric.compute()
    with pytest.raises(ConfigError, match="do not match"):
        FewShotIoU([1, 3]).load_state_dict(metric.state_dict())


def test_bad_input_is_rejected_with_clear_errors():
    metric = FewShotIoU([1, 2])
    with pytest.raises(ConfigError, match=r"class\(es\) \[5\] not among"):
        metric.update(torch.zeros(2, 2), torch.zeros(2, 2), 5)
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(2, 2), torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="2 class ids for a batch of 3"):
        metric.update(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), [1, 2])
    with pytest.raises(ValueError, match="target values"):
        metric.update(torch.zeros(2, 2), torch.full((2, 2), 3), 1)
    with pytest.raises(ValueError, match="prediction values"):
        metric.update(torch.full((2, 2), 255), torch.zeros(2, 2), 1)
    with pytest.raises(ConfigError):
        FewShotIoU([1, 1])
    # nothing of the rejected updates was counted
    assert metric.compute()["episodes"] == 0


def test_all_reduce_is_a_noop_without_a_process_group():
    metric = hand_metric()
    before = metric.state_dict()
    metric.all_reduce()
    after = metric.state_dict()
    assert all(torch.equal(before[k], v) for k, v in after.items() if isinstance(v, torch.Tensor))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_state_follows_the_device_of_the_first_update():
    metric = FewShotIoU([1, 2])
    pred, target, cls = EP1
    metric.update(pred.cuda(), target.cuda(), cls)
    assert metric.device.type == "cuda"
    metric.update(*EP2[:2], EP2[2])  # later CPU tensors are moved to the state's device
    reference = FewShotIoU([1, 2])
    reference.update(*EP1)
    reference.update(*EP2)
    assert metric.compute() == reference.compute()


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        pred, target, cls = random_episodes(8, seed=3)
        metric = FewShotIoU([1, 2, 3])
        metric.update(pred[rank::2], target[rank::2], cls[rank::2])
        metric.all_reduce()
        torch.save(metric.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_all_reduce_over_two_gloo_processes_matches_one_process(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    pred, target, cls = random_episodes(8, seed=3)
    single = FewShotIoU([1, 2, 3])
    single.update(pred, target, cls)
    for rank in range(2):
        reduced = FewShotIoU([1, 2, 3])
        reduced.load_state_dict(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True))
        assert_same_state(reduced, single)


def test_aggregate_seeds_mean_and_population_std():
    results = [
        {"miou": 0.5, "fbiou": 0.7, "fg_iou": 0.4, "bg_iou": 1.0, "class_iou": {1: 0.2, 2: 0.8}},
        {"miou": 0.6, "fbiou": 0.7, "fg_iou": 0.4, "bg_iou": 1.0, "class_iou": {1: 0.4, 2: None}},
        # read back from JSON: class keys are strings
        {"miou": 0.7, "fbiou": 0.7, "fg_iou": 0.4, "bg_iou": 1.0, "class_iou": {"1": 0.6, "2": 0.6}},
    ]
    out = aggregate_seeds(results)
    assert out["seeds"] == 3
    assert out["miou"]["mean"] == pytest.approx(0.6)
    assert out["miou"]["std"] == pytest.approx(math.sqrt(0.02 / 3))  # population std, ddof = 0
    assert out["fbiou"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.0), "n": 3}
    assert out["class_iou"][1]["mean"] == pytest.approx(0.4)
    assert out["class_iou"][1]["std"] == pytest.approx(np.std([0.2, 0.4, 0.6]))
    assert out["class_iou"][2] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1), "n": 2}
    with pytest.raises(ValueError):
        aggregate_seeds([])


def test_aggregate_seeds_of_real_compute_results():
    a, b = hand_metric(), FewShotIoU([1, 2])
    b.update(*EP2)
    b.update(*EP1)
    out = aggregate_seeds([a.compute(), b.compute()])
    expected = [a.compute()["miou"], b.compute()["miou"]]
    assert out["miou"]["mean"] == pytest.approx(np.mean(expected))
    assert out["miou"]["std"] == pytest.approx(np.std(expected))
