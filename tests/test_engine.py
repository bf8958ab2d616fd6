"""Training and evaluation engine: resume, cache equivalence, multi-process, CLI, bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dedn.cli import main
from dedn.config import load_config, to_dict
from dedn.data.episodes import sample_test_episodes
from dedn.engine.benchmark import build_benchmark
from dedn.engine.checkpoint import load_checkpoint, load_trained_model, save_checkpoint, trainable_state
from dedn.engine.distributed import resolve_device
from dedn.engine.evaluate import evaluate_episodes
from dedn.engine.features import FeatureCache
from dedn.engine.train import Trainer
from dedn.errors import CheckpointError, ConfigError
from dedn.models.network import FewShotSegmenter

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "model.backbone=toy",
    "model.weights=null",
    "model.channels=16",
    "data.image_size=64",
    "data.synthetic.image_size=96",
    "data.synthetic.images_per_class=6",
    "train.batch_size=2",
    "train.steps=6",
    "train.log_every=2",
    "train.val_every=3",
    "train.val_episodes=4",
    "train.checkpoint_every=3",
    "eval.episodes=12",
    "eval.seeds=[0, 1]",
]


def tiny_config(tmp_path, *extra):
    return load_config(None, TINY + [f"output_dir={tmp_path}", *extra])


@pytest.mark.parametrize("feature_cache", [True, False])
def test_resume_matches_an_uninterrupted_run(tmp_path, feature_cache):
    cache = f"train.feature_cache={str(feature_cache).lower()}"
    full = Trainer(
        tiny_config(tmp_path / "full", cache), tmp_path / "full", torch.device("cpu"), progress=False
    )
    full.fit()
    interrupted = Trainer(
        tiny_config(tmp_path / "cut", cache), tmp_path / "cut", torch.device("cpu"), progress=False
    )
    interrupted.fit(stop_after=3)
    assert interrupted.step == 3
    resumed = Trainer(
        tiny_config(tmp_path / "cut", cache), tmp_path / "cut", torch.device("cpu"), progress=False
    )
    resumed.resume(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert resumed.step == 3
    resumed.fit()
    a, b = trainable_state(full.model), trainable_state(resumed.model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the run left its logs, config and checkpoints
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert any("val/miou" in line for line in lines)
    assert (tmp_path / "full" / "config.yaml").is_file()
    machine = json.loads((tmp_path / "full" / "machine.json").read_text())
    assert machine["threads"] == torch.get_num_threads() and machine["torch"] == torch.__version__
    state = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    assert set(state) >= {"model", "optimizer", "scheduler", "step", "config"}
    assert state["step"] == 6


def _trained_model(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=2", "train.feature_cache=true")
    Trainer(cfg, tmp_path, torch.device("cpu"), progress=False).fit()
    model, _ = load_trained_model(cfg, str(tmp_path / "checkpoints" / "last.pt"), torch.device("cpu"))
    return cfg, model


def test_cached_and_uncached_evaluation_agree_exactly(tmp_path):
    cfg, model = _trained_model(tmp_path)
    bench = build_benchmark(cfg.data)
    episodes = sample_test_episodes(bench.split.test_pairs, 16, 2, seed=3)
    args = (model, bench.test_source, episodes, bench.split.novel, cfg.data.image_size, torch.device("cpu"))
    cache = FeatureCache()
    cached = evaluate_episodes(*args, cache=cache, progress=False)
    uncached = evaluate_episodes(*args, cache=None, progress=False)
    assert cache.hits > 0  # images recur across episodes
    for key in ("class_intersection", "class_union", "totals"):
        assert torch.equal(cached.state_dict()[key], uncached.state_dict()[key])
    assert cached.compute() == uncached.compute()


def test_feature_cache_evicts_by_bytes():
    cache = FeatureCache(max_bytes=3 * 4 * 10)
    for i in range(5):
        cache.get(str(i), lambda: {"x": torch.zeros(10)})
    assert len(cache) == 3 and cache.bytes == 120
    cache.get("4", lambda: pytest.fail("should be cached"))


def test_train_then_eval_from_the_command_line(tmp_path, capsys):
    sets = [a for s in TINY for a in ("--set", s)]
    assert main(["train", "--quiet", "--output", str(tmp_path), *sets]) == 0
    ckpt = tmp_path / "checkpoints" / "best.pt"
    assert ckpt.is_file()
    out = tmp_path / "eval"
    assert main(["eval", "--quiet", "--output", str(out), "--checkpoint", str(ckpt), *sets]) == 0
    results = json.loads((out / "results.json").read_text())
    s = results["settings"]
    assert s["shots"] == 1 and s["episodes"] == 12 and s["seeds"] == [0, 1] and s["image_size"] == 64
    assert s["backbone"] == "toy" and len(s["checkpoint_sha256"]) == 64
    assert s["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert len(results["per_seed"]) == 2
    assert 0.0 <= results["summary"]["miou"]["mean"] <= 1.0
    assert (out / "results.md").read_text().startswith("# dedn")
    # the episode files are reused by a second evaluation (training-free baseline, no checkpoint)
    out2 = tmp_path / "eval-proto"
    episode_dir = out / "episodes"
    assert (
        main(
            [
                "eval",
                "--quiet",
                "--output",
                str(out2),
                *sets,
                "--set",
                "model.method=proto",
                "--set",
                f"eval.episode_dir={episode_dir}",
            ]
        )
        == 0
    )
    proto = json.loads((out2 / "results.json").read_text())
    assert [r["episode_file"] for r in proto["per_seed"]] == [r["episode_file"] for r in results["per_seed"]]


def test_checkpoint_from_another_configuration_is_refused(tmp_path, capsys):
    cfg, _ = _trained_model(tmp_path)
    other = tiny_config(tmp_path, "model.channels=32")
    with pytest.raises(CheckpointError, match="model.channels"):
        load_trained_model(other, str(tmp_path / "checkpoints" / "last.pt"), torch.device("cpu"))
    sets = [a for s in TINY for a in ("--set", s)]
    code = main(
        [
            "eval",
            "--quiet",
            "--checkpoint",
            str(tmp_path / "checkpoints" / "last.pt"),
            *sets,
            "--set",
            "model.scenario.normalization=none",
        ]
    )
    assert code == 2
    assert "model.scenario.normalization" in capsys.readouterr().err


def test_not_a_checkpoint_and_missing_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_trained_model(cfg, str(bad), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="must be trained"):
        load_trained_model(cfg, None, torch.device("cpu"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trained_model(cfg, str(tmp_path / "nope.pt"), torch.device("cpu"))


def test_checkpoint_with_wrong_tensors_is_refused(tmp_path):
    cfg, model = _trained_model(tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    state["model"].pop(next(iter(state["model"])))
    save_checkpoint(tmp_path / "broken.pt", state)
    with pytest.raises(CheckpointError, match="missing"):
        load_trained_model(cfg, str(tmp_path / "broken.pt"), torch.device("cpu"))


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  chanels: 8\n")
    assert main(["eval", str(config), "--set", "model.method=proto"]) == 2
    err = capsys.readouterr().err
    assert "model.chanels" in err and "c.yaml" in err
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="train.negative_episodes = 1.0"):
        load_config(None, ["train.negative_episodes=1.0"])


def test_an_unusable_device_is_a_clear_error(capsys, monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'gpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="'mps': only cpu and cuda"):
        resolve_device("mps")
    # past the last GPU where there is CUDA, no CUDA at all where there is none: either way named
    with pytest.raises(ConfigError, match="'cuda:64'"):
        resolve_device("cuda:64")
    # CUDA without an index is the process's own GPU under torchrun, which needs one GPU per process
    monkeypatch.setenv("LOCAL_RANK", "64")
    with pytest.raises(ConfigError, match="process 64|no CUDA device"):
        resolve_device("cuda")
    if torch.cuda.is_available():
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_RANK")
    assert main(["eval", "--set", "model.method=proto", "--set", "device=cuda:64"]) == 2
    assert "device 'cuda:64'" in capsys.readouterr().err


def _torchrun(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dedn.cli",
        *args,
    ]
    # a new session, so that a hung run can be killed with all its workers
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {args[0]} did not finish in 300 s")
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_process_training_and_sharded_evaluation(tmp_path):
    # the CPU (gloo) path, also on a machine with a single GPU, where "auto" would refuse a second process
    sets = [a for s in [*TINY, "device=cpu"] for a in ("--set", s)]
    _torchrun(
        ["train", "--quiet", "--output", str(tmp_path / "ddp"), *sets, "--set", "train.steps=3"], tmp_path
    )
    ckpt = tmp_path / "ddp" / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["step"] == 3
    _torchrun(
        ["eval", "--quiet", "--output", str(tmp_path / "eval2"), "--checkpoint", str(ckpt), *sets], tmp_path
    )
    assert (
        main(
            [
                "eval",
                "--quiet",
                "--output",
                str(tmp_path / "eval1"),
                "--checkpoint",
                str(ckpt),
                *sets,
                "--set",
                f"eval.episode_dir={tmp_path / 'eval2' / 'episodes'}",
            ]
        )
        == 0
    )
    two = json.loads((tmp_path / "eval2" / "results.json").read_text())
    one = json.loads((tmp_path / "eval1" / "results.json").read_text())
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1
    for a, b in zip(two["per_seed"], one["per_seed"], strict=True):
        assert (
            a["class_iou"] == b["class_iou"] and a["fbiou"] == b["fbiou"] and a["episodes"] == b["episodes"]
        )


def test_checkpoint_from_before_head_inputs_loads_as_the_features_layout(tmp_path):
    """Checkpoints saved before model.head_inputs existed have the query-features head layout."""
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, "model.head_inputs=features")
    model = FewShotSegmenter(cfg.model)
    state = {"model": trainable_state(model), "config": to_dict(cfg)}
    del state["config"]["model"]["head_inputs"]
    save_checkpoint(tmp_path / "old.pt", state)
    loaded, _ = load_trained_model(cfg, str(tmp_path / "old.pt"), torch.device("cpu"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trainable_state(model).items())
    with pytest.raises(CheckpointError, match="head_inputs: checkpoint 'features', config 'relations'"):
        load_trained_model(tiny_config(tmp_path), str(tmp_path / "old.pt"), torch.device("cpu"))


def _saved_model(tmp_path, name, seed, *extra):
    """A randomly initialised model of the tiny config saved as a checkpoint: (path, model)."""
    torch.manual_seed(seed)
    cfg = tiny_config(tmp_path, *extra)
    model = FewShotSegmenter(cfg.model).eval()
    path = save_checkpoint(tmp_path / f"{name}.pt", {"model": trainable_state(model), "config": to_dict(cfg)})
    return path, model


def test_assembled_dedn_runs_each_expert_exactly_as_it_was_trained(tmp_path, capsys):
    obj_path, obj = _saved_model(tmp_path, "object", 1, "model.method=object")
    scen_path, scen = _saved_model(tmp_path, "scenario", 2, "model.method=scenario")
    out = tmp_path / "dedn.pt"
    assert (
        main(["assemble", "--object", str(obj_path), "--scenario", str(scen_path), "--output", str(out)]) == 0
    )
    assert "model.reduce=per_expert" in capsys.readouterr().out
    cfg = tiny_config(tmp_path, "model.method=dedn", "model.reduce=per_expert", "model.fusion.gate=false")
    dedn, _ = load_trained_model(cfg, str(out), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    query, supports = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 1, 3, 64, 64, generator=g)
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.long)
    masks[..., 16:40, 20:44] = 1
    with torch.no_grad():
        fused = dedn(query, supports, masks)
        alone = {"object": obj(query, supports, masks), "scenario": scen(query, supports, masks)}
    for name in ("object", "scenario"):
        torch.testing.assert_close(fused["experts"][name], alone[name]["logits"], rtol=0, atol=1e-5)
    # the two experts differ, so the fused output is neither of them
    assert not torch.allclose(fused["experts"]["object"], fused["experts"]["scenario"], atol=1e-3)
    assert fused["probability"].shape == (2, 2, 64, 64)
    # a config without the assembled layout is refused, naming the setting
    with pytest.raises(CheckpointError, match="model.reduce"):
        load_trained_model(tiny_config(tmp_path, "model.fusion.gate=false"), str(out), torch.device("cpu"))


def test_assemble_refuses_the_wrong_methods_and_mismatched_models(tmp_path, capsys):
    obj_path, _ = _saved_model(tmp_path, "object", 1, "model.method=object")
    scen_path, _ = _saved_model(tmp_path, "scenario", 2, "model.method=scenario")
    wide_path, _ = _saved_model(tmp_path, "wide", 3, "model.method=scenario", "model.channels=32")
    out = tmp_path / "dedn.pt"
    # swapped: the object checkpoint given as the scenario expert
    assert (
        main(["assemble", "--object", str(scen_path), "--scenario", str(obj_path), "--output", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert "scenario.pt" in err and "model.method = object" in err
    assert (
        main(["assemble", "--object", str(obj_path), "--scenario", str(wide_path), "--output", str(out)]) == 2
    )
    assert "model.channels: 16 and 32" in capsys.readouterr().err
    assert not out.exists()


def test_pseudo_novel_validation_uses_only_the_held_out_classes(tmp_path):
    from dedn.engine.train import validation_episodes

    cfg = tiny_config(tmp_path, "data.val_classes=[6, 7]")
    bench = build_benchmark(cfg.data, progress=False)
    assert bench.split.val_classes == [6, 7] and 6 not in bench.split.base
    episodes = validation_episodes(cfg, bench)
    assert episodes and {e.class_id for e in episodes} <= {6, 7}
    # no training image shows a held-out class, so neither a query nor a support of a training episode can
    trained_on = set(bench.split.train_images)
    assert not {i for e in episodes for i in (e.query, *e.supports)} & trained_on
    assert all(p.class_id not in (6, 7) for p in bench.split.train_pairs)
    with pytest.raises(ConfigError, match=r"data.val_classes = \[3\] \(fold 0\).*not base classes"):
        build_benchmark(tiny_config(tmp_path, "data.val_classes=[3]").data, progress=False)


def test_demo_and_app_do_not_import_the_command_line():
    """One entry point per concern: the model loader lives in the engine, and dedn.cli imports dedn.demo
    (its `demo` subcommand), never the other way round; no import anywhere in their source, lazy or not."""
    import ast

    for module in ("demo", "app"):
        tree = ast.parse((REPO / "src" / "dedn" / f"{module}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "dedn.cli" not in imported, module
        assert module != "demo" or "dedn.engine.checkpoint" in imported


def test_awf_support_scores_are_computed_once_per_support_set(tmp_path, monkeypatch):
    """A support set that recurs across episodes is scored once; the metric is bit-identical to scoring
    it every time."""
    from dedn.engine import evaluate as evaluate_module

    cfg, model = _trained_model(tmp_path)
    bench = build_benchmark(cfg.data)
    base = sample_test_episodes(bench.split.test_pairs, 6, 1, seed=3)
    # each support set twice, with another query the second time
    episodes = base + [
        dataclasses.replace(e, query=base[(i + 1) % len(base)].query) for i, e in enumerate(base)
    ]
    episodes = [e for e in episodes if e.query not in e.supports]
    args = (model, bench.test_source, episodes, bench.split.novel, cfg.data.image_size, torch.device("cpu"))
    calls = []
    original = model.support_scores
    monkeypatch.setattr(model, "support_scores", lambda *a, **k: calls.append(1) or original(*a, **k))
    reused = evaluate_episodes(*args, progress=False)
    distinct = len({(tuple(e.supports), e.class_id) for e in episodes})
    assert len(calls) == distinct < len(episodes)
    calls.clear()
    fresh_runner = evaluate_module.EpisodeRunner(
        model, bench.test_source, cfg.data.image_size, torch.device("cpu"), None
    )
    fresh_runner._scores = _NeverStores()
    fresh = evaluate_module.FewShotIoU(bench.split.novel)
    for e in episodes:
        prediction, target, _ = fresh_runner.run(e)
        fresh.update(prediction, target, e.class_id)
    assert len(calls) == len(episodes)
    for key in ("class_intersection", "class_union", "totals"):
        assert torch.equal(reused.state_dict()[key], fresh.state_dict()[key])


class _NeverStores(dict):
    """A score cache that keeps nothing: every episode scores its supports again."""

    def __setitem__(self, key, value):
        pass

    def popitem(self, last=True):
        return None


def _counted_evaluation(tmp_path, monkeypatch, method: str, n: int, shots: int, **fusion):
    """A trained toy model with the ``fusion`` settings, ``n`` test episodes of ``shots``, the arguments of
    ``evaluate_episodes`` and a list that grows by one per call of the model's ``method``."""
    cfg, model = _trained_model(tmp_path)
    for key, value in fusion.items():
        setattr(model.cfg.fusion, key, value)
    bench = build_benchmark(cfg.data)
    episodes = sample_test_episodes(bench.split.test_pairs, n, shots, seed=3)
    args = (model, bench.test_source, episodes, bench.split.novel, cfg.data.image_size, torch.device("cpu"))
    calls = []
    original = getattr(model, method)
    monkeypatch.setattr(model, method, lambda *a, **k: calls.append(1) or original(*a, **k))
    return model, episodes, args, calls


def test_self_support_pass_scores_each_support_image_once(tmp_path, monkeypatch):
    """support_pass=self at K > 1: a (support image, class) that recurs across episodes, in any position,
    is scored once; the metric is bit-identical to scoring every episode's shots inside the model."""
    from dedn.engine import evaluate as evaluate_module

    model, episodes, args, calls = _counted_evaluation(
        tmp_path, monkeypatch, "shot_scores", 12, 2, matcher="proto", support_pass="self"
    )
    reused = evaluate_episodes(*args, progress=False)
    distinct = len({(sid, e.class_id) for e in episodes for sid in e.supports})
    assert len(calls) == distinct < 2 * len(episodes)
    # the model's own pass over all shots of each episode, nothing reused
    monkeypatch.setattr(evaluate_module.EpisodeRunner, "_self_scores", lambda *a: None)
    inside = evaluate_episodes(*args, progress=False)
    for key in ("class_intersection", "class_union", "totals"):
        assert torch.equal(reused.state_dict()[key], inside.state_dict()[key])


def test_evaluation_fits_the_probe_once_per_support_set(tmp_path, monkeypatch):
    """matcher=probe: a support set that recurs across episodes is fitted once (with its support scores);
    the metric is bit-identical to fitting it in every episode."""
    from dedn.engine import evaluate as evaluate_module

    model, episodes, args, calls = _counted_evaluation(
        tmp_path, monkeypatch, "fit_probe", 16, 1, matcher="probe"
    )
    reused = evaluate_episodes(*args, progress=False)
    distinct = len({(tuple(e.supports), e.class_id) for e in episodes})
    # one fit for the query pass and one inside the support-score pass, per distinct support set
    assert len(calls) == 2 * distinct < 2 * len(episodes)
    calls.clear()
    monkeypatch.setattr(evaluate_module.EpisodeRunner, "_max_scores", 0)  # nothing kept
    fresh = evaluate_episodes(*args, progress=False)
    assert len(calls) == 2 * len(episodes)
    for key in ("class_intersection", "class_union", "totals"):
        assert torch.equal(reused.state_dict()[key], fresh.state_dict()[key])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "adam"])
def test_each_optimizer_trains_and_resumes_its_own_state(tmp_path, optimizer):
    """train.optimizer (the peers' own recipes, issue 40): each one updates the weights, and its state
    (momentum, Adam's moments) travels in the checkpoint, so a resumed run equals an uninterrupted one."""
    settings = [f"train.optimizer={optimizer}", "train.lr=0.001", "train.feature_cache=true"]
    full = Trainer(
        tiny_config(tmp_path / "full", *settings), tmp_path / "full", torch.device("cpu"), progress=False
    )
    start = {k: v.clone() for k, v in trainable_state(full.model).items()}
    full.fit()
    kinds = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
    assert type(full.optimizer) is kinds[optimizer]
    assert any(not torch.equal(start[k], v) for k, v in trainable_state(full.model).items())
    cut = Trainer(
        tiny_config(tmp_path / "cut", *settings), tmp_path / "cut", torch.device("cpu"), progress=False
    )
    cut.fit(stop_after=3)
    resumed = Trainer(
        tiny_config(tmp_path / "cut", *settings), tmp_path / "cut", torch.device("cpu"), progress=False
    )
    resumed.resume(tmp_path / "cut" / "checkpoints" / "last.pt")
    resumed.fit()
    for key, value in trainable_state(full.model).items():
        assert torch.equal(value, trainable_state(resumed.model)[key]), key


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(None, ["train.optimizer=lamb"])


def test_slow_modules_train_at_their_own_rate(tmp_path):
    """train.slow_modules / slow_lr (HDMNet's recipe: its transformer at a tenth of the rest's rate): the
    named parameters form their own group at lr * slow_lr, every other trainable parameter keeps lr, and
    nothing is left out or counted twice."""
    settings = ["train.optimizer=adamw", "train.lr=0.001", "train.feature_cache=true"]
    cfg = tiny_config(tmp_path, *settings, "train.slow_modules=[experts.object]", "train.slow_lr=0.1")
    trainer = Trainer(cfg, tmp_path, torch.device("cpu"), progress=False)
    fast, slow = trainer.optimizer.param_groups
    assert fast["lr"] == pytest.approx(0.001) and slow["lr"] == pytest.approx(0.0001)
    names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {names[id(p)].startswith("experts.object.") for p in slow["params"]} == {True}
    assert not any(names[id(p)].startswith("experts.object.") for p in fast["params"])
    assert len(fast["params"]) + len(slow["params"]) == len(names)
    # the schedule scales both groups alike
    trainer.fit(stop_after=2)
    assert slow["lr"] == pytest.approx(fast["lr"] * 0.1)


def test_slow_modules_that_name_nothing_are_refused(tmp_path):
    cfg = tiny_config(tmp_path, "train.slow_modules=[experts.transformer]")
    with pytest.raises(ConfigError, match="experts.transformer names no trainable parameter"):
        Trainer(cfg, tmp_path, torch.device("cpu"), progress=False)
    with pytest.raises(ConfigError, match="train.slow_lr"):
        load_config(None, ["train.slow_lr=0"])
