"""The experiment scripts: the table runner and the validation sweep, on the tiny synthetic setting."""

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

from dedn.config import flatten, load_config, to_dict
from test_engine import TINY

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_table_runner_trains_once_per_fold_and_scores_every_shot_count(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    rows = ["dedn", "proto", "dedn, plain averaging instead of AWF"]
    args = ["--config", str(REPO / "configs" / "synthetic.yaml"), "--folds", "0", "--shots", "1", "2"]
    run_script("pascal_table.py", *args, "--rows", *rows, "--out", str(tmp_path), *sets)
    records = json.loads((tmp_path / "table.json").read_text())
    assert sorted((r["row"], r["shots"]) for r in records) == sorted((r, k) for r in rows for k in (1, 2))
    # one trained model, scored 1- and 2-shot and with plain averaging; proto has no checkpoint
    assert len(list((tmp_path / "models").iterdir())) == 1
    trained = [r for r in records if r["row"] != "proto"]
    assert len({r["checkpoint"] for r in trained}) == 1
    assert all("checkpoint" not in r for r in records if r["row"] == "proto")
    for r in records:
        assert r["settings"]["shots"] == r["shots"] and r["settings"]["seeds"] == [0, 1]
        assert 0.0 <= r["miou"]["mean"] <= 1.0
    mean_row = next(r for r in records if r["row"] == rows[2] and r["shots"] == 1)
    assert "model.fusion.mode=mean" in mean_row["overrides"]
    # every row of a fold and shot count is scored on the same episode files
    for shots in (1, 2):
        files = {
            tuple(
                json.loads((tmp_path / "eval" / d / "results.json").read_text())["per_seed"][i][
                    "episode_file"
                ]
                for i in range(2)
            )
            for d in [p.name for p in (tmp_path / "eval").iterdir() if p.name.endswith(f"-{shots}shot")]
        }
        assert len(files) == 1
    table = (tmp_path / "table.md").read_text()
    assert "### 2-shot" in table and "| proto |" in table and "Wall time" in table
    # the DEDN rows also list each expert and fusion of their model, from the record of the same pass;
    # the training-free row has no parts
    dedn_1shot = next(r for r in records if r["row"] == "dedn" and r["shots"] == 1)
    results = json.loads((tmp_path / "eval" / "dedn-fold0-1shot" / "results.json").read_text())
    assert set(dedn_1shot["parts"]) == {"object", "scenario", "fusion=mean", "fusion=gate"}
    assert dedn_1shot["parts"] == {n: part["miou"] for n, part in results["experts"].items()}
    assert all(not r["parts"] for r in records if r["row"] == "proto")
    parts = table.split("experts and fusions", 1)[1].split("Wall time", 1)[0]
    assert "| dedn | its object expert alone |" in parts and "| dedn | fused by mean |" in parts
    assert "| proto |" not in parts
    # a second call repeats nothing: the results are only collected again
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("results.json")}
    run_script("pascal_table.py", *args, "--rows", *rows, "--out", str(tmp_path), *sets)
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("results.json")}
    # a row whose settings changed since its model was trained (here the learning rate, as after a change
    # of default) is not scored with that model: the script stops, names the folder and the difference
    changed = [*args, "--rows", "dedn", "--out", str(tmp_path), *sets, "--set", "train.lr=0.5"]
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pascal_table.py"), *changed], capture_output=True, text=True
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "method=dedn-fold0 was trained with other settings" in done.stderr
    assert "train.lr: " in done.stderr and "-> 0.5" in done.stderr
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("results.json")}


def test_table_runner_can_train_one_model_per_shot_count(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    args = ["--config", str(REPO / "configs" / "synthetic.yaml"), "--folds", "0", "--shots", "1", "2"]
    table = ["--rows", "dedn", "--train-shots", "test", "--out", str(tmp_path)]
    run_script("pascal_table.py", *args, *table, *sets)
    models = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert models == ["method=dedn-fold0", "method=dedn-fold0-train2shot"]
    for name, shots in zip(models, (1, 2), strict=True):
        assert load_config(tmp_path / "models" / name / "config.yaml").data.shots == shots
    records = {r["shots"]: r for r in json.loads((tmp_path / "table.json").read_text())}
    assert Path(records[2]["checkpoint"]).parents[1].name == models[1]
    assert Path(records[1]["checkpoint"]).parents[1].name == models[0]
    # the evaluations of one --out are of models trained one way: the other way is refused, with a message
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pascal_table.py"), *args, "--rows", "dedn"]
        + ["--out", str(tmp_path), *sets],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--train-shots test" in done.stderr


def test_length_search_chooses_the_best_validated_step_and_can_stop_there(tmp_path):
    # the search sets the length and validation cadence itself: TINY's own are left out
    tiny = [s for s in TINY if not s.startswith(("train.steps=", "train.val_every="))]
    sets = [a for s in tiny for a in ("--set", s)]
    args = ["--config", str(REPO / "configs" / "synthetic.yaml"), "--folds", "0", "--shots", "1"]
    search = [
        "--length",
        "pseudo-novel",
        "--length-cap",
        "4",
        "--length-every",
        "2",
        "--length-classes",
        "7",
        "18",
    ]
    run_script(
        "pascal_table.py", *args, "--rows", "dedn", *search, "--search-only", "--out", str(tmp_path), *sets
    )
    chosen = json.loads((tmp_path / "lengths.json").read_text())["dedn"]
    assert sorted(chosen["curve"]) == ["2", "4"] and chosen["held_out_classes"] == [7, 18]
    best = max(chosen["curve"].values())
    assert chosen["val_miou"] == best and chosen["curve"][str(chosen["steps"])] == best
    # the searched model held the classes out and validated on them only; no fold model, no evaluation
    (run,) = (tmp_path / "length" / "models").iterdir()
    config = load_config(run / "config.yaml")
    assert list(config.data.val_classes) == [7, 18] and config.train.steps == 4
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()
    # --search-only means nothing without a search
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pascal_table.py"), *args, "--rows", "dedn", "--search-only"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "needs --length pseudo-novel" in done.stderr


def test_trained_apart_row_reuses_the_expert_rows_models_and_scores_them_unchanged(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    rows = ["object", "scenario", "dedn of experts trained apart, AWF"]
    args = ["--config", str(REPO / "configs" / "synthetic.yaml"), "--folds", "0", "--shots", "1"]
    run_script("pascal_table.py", *args, "--rows", *rows, "--out", str(tmp_path), *sets)
    # two trainings; the assembled model is made from them, not trained
    models = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert models == ["apart-fold0", "method=object-fold0", "method=scenario-fold0"]
    records = {r["row"]: r for r in json.loads((tmp_path / "table.json").read_text())}
    apart = records[rows[2]]
    assert apart["train_seconds"] == records["object"]["train_seconds"] + records["scenario"]["train_seconds"]
    results = json.loads(
        (tmp_path / "eval" / "dedn-of-experts-trained-apart--awf-fold0-1shot" / "results.json").read_text()
    )
    # inside the assembled DEDN each expert scores exactly what its own row scored, seed by seed
    for name in ("object", "scenario"):
        alone = json.loads((tmp_path / "eval" / f"{name}-fold0-1shot" / "results.json").read_text())[
            "per_seed"
        ]
        inside = [seed["experts"][name]["miou"] for seed in results["per_seed"]]
        assert inside == [seed["miou"] for seed in alone]


def test_validation_sweep_records_every_trial(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    config = str(REPO / "configs" / "synthetic.yaml")
    out = run_script(
        "val_sweep.py",
        *("--config", config, "--param", "model.baseline.prior_threshold", "--values", "0.3", "0.6"),
        *("--folds", "0", "--set", "model.method=prior", "--out", str(tmp_path / "prior"), *sets),
    )
    trials = json.loads((tmp_path / "prior" / "sweep.json").read_text())
    assert [t["value"] for t in trials] == ["0.3", "0.6"]
    assert all(0.0 <= t["val_miou"] <= 1.0 and t["best_step"] is None for t in trials)
    assert trials[0]["val_miou"] != trials[1]["val_miou"]  # the threshold changes the prediction
    assert "| 0.3 |" in out
    run_script(
        "val_sweep.py",
        *("--config", config, "--param", "loss.distill.weight", "--values", "0.5"),
        *("--folds", "0", "--out", str(tmp_path / "kd"), *sets),
    )
    (trial,) = json.loads((tmp_path / "kd" / "sweep.json").read_text())
    assert trial["best_step"] in (3, 6) and trial["val_miou"] > 0


def test_validation_sweep_scores_a_trained_model_under_test_time_settings(tmp_path):
    from dedn.cli import main

    sets = [a for s in TINY for a in ("--set", s)]
    assert main(["train", "--quiet", "--output", str(tmp_path / "model"), *sets]) == 0
    run_script(
        "val_sweep.py",
        *("--config", str(REPO / "configs" / "synthetic.yaml"), "--param", "model.fusion.mode"),
        *("--values", "awf", "mean", "--folds", "0", "--out", str(tmp_path / "fusion"), *sets),
        *("--checkpoint", str(tmp_path / "model" / "checkpoints" / "best.pt")),
    )
    trials = json.loads((tmp_path / "fusion" / "sweep.json").read_text())
    assert [t["value"] for t in trials] == ["awf", "mean"]
    for t in trials:
        assert t["best_step"] is None  # scored, not trained
        assert {"val_miou_object", "val_miou_scenario"} <= set(t)
    # the experts do not depend on the fusion; the fused output may
    assert trials[0]["val_miou_object"] == trials[1]["val_miou_object"]


def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    """benchmarks/<name>.py on the synthetic config with the tiny settings, from the repository root."""
    sets = [a for s in TINY for a in ("--set", s)]
    script = str(REPO / "benchmarks" / f"{name}.py")
    config = str(REPO / "configs" / "synthetic.yaml")
    done = subprocess.run(
        [sys.executable, script, "--config", config, *args, *sets], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_train_step_benchmark_prints_a_time_per_method():
    done = run_benchmark("train_step", "--methods", "dedn", "scenario", "--steps", "1")
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith(("| dedn", "| scenario"))]
    assert [r[1].strip() for r in rows] == ["dedn", "scenario"]
    assert all(float(r[2]) > 0 for r in rows) and "x 6 steps" in done.stdout


def test_peers_benchmark_prints_one_row_per_method():
    done = run_benchmark("peers", "--methods", "proto", "hdmnet", "--episodes", "2", "--steps", "1")
    rows = [
        line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith(("| proto", "| hdmnet"))
    ]
    assert [r[0].strip() for r in rows] == ["proto", "hdmnet"]
    proto, hdmnet = ([c.strip() for c in r] for r in rows)
    assert proto[1] == "0" and proto[2].startswith("-") and int(hdmnet[1].replace(",", "")) > 0
    assert float(hdmnet[2].split()[0]) > 0 and "x 6 =" in hdmnet[2]  # TINY's train.steps
    for row in (proto, hdmnet):
        assert float(row[3]) > 0 and float(row[4]) > 0  # ms per episode at 1 and 5 shots
        assert all(float(mb) > 0 for mb in row[5].split(" / "))


def test_peers_benchmark_multiplies_each_step_time_by_the_methods_own_length():
    import argparse

    peers = load_script_from("benchmarks", "peers")
    own = argparse.Namespace(lengths="own", config=str(REPO / "configs" / "pascal_offline.yaml"))
    steps = load_config(REPO / "configs" / "pfenet_offline.yaml").train.steps
    assert peers.own_steps("pfenet", own) == (steps, "pfenet_offline.yaml")
    assert peers.own_steps("dedn", own) == (500, "pascal_offline.yaml")  # no dedn_offline.yaml
    same = argparse.Namespace(lengths="config", config=own.config)
    assert peers.own_steps("pfenet", same) == (500, "pascal_offline.yaml")


def test_probe_benchmark_prints_the_fit_and_the_query_cost():
    done = run_benchmark("probe", "--split", "none", "--sets", "3")
    lines = [line for line in done.stdout.splitlines() if "median" in line]
    names = ["probe", "probe", "probe", "proto", "coverage"] * 2
    assert len(lines) == 10 and [line.split()[0] for line in lines] == names
    fits = [line.split("(")[-1].rstrip(")") for line in lines if "fit per support set" in line]
    assert fits == ["logistic", "ridge"] * 2
    assert all(float(line.split("median")[1].split()[0]) > 0 for line in lines)


def shipped_model_benchmark(name: str, *args: str) -> str:
    """benchmarks/<name>.py, which runs the shipped model (no config), from the repository root."""
    script = str(REPO / "benchmarks" / f"{name}.py")
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_threads_benchmark_times_each_thread_count():
    stdout = shipped_model_benchmark("threads", "--queries", "2")
    rows = [line for line in stdout.splitlines() if "thread(s) (" in line]
    assert rows and rows[0].lstrip().startswith("1 thread(s) (1")
    assert all(float(r.split("median")[1].split()[0]) > 0 for r in rows)


def load_script(name: str):
    """A script under scripts/ imported as a module (scripts/ is not a package)."""
    return load_script_from("scripts", name)


def load_script_from(folder: str, name: str):
    """``<folder>/<name>.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_cells_say_when_a_row_has_one_test_seed():
    table = load_script("pascal_table")
    assert table.cell({"mean": 0.4876, "std": 0.0071, "n": 5}) == "48.8 +- 0.7"
    # a seed-0-only row has no spread to show, and must not look like one with a std of 0
    assert table.cell({"mean": 0.4876, "std": 0.0, "n": 1}) == "48.8 (1 seed)"


def test_whole_table_driver_plans_every_row_of_the_issue_once_per_fold(tmp_path):
    out = run_script("pascal_all.py", "--dry-run", "--root", str(tmp_path))
    commands = [shlex.split(line) for line in out.splitlines()]
    runs = [c for c in commands if "--collect" not in c]
    collects = [c for c in commands if "--collect" in c]
    assert {c[c.index("--out") + 1] for c in collects} == {
        str(tmp_path / g) for g in ("main-1shot", "main-5shot", "ablations")
    }

    def rows(group: str, fold: int) -> list[str]:
        found = []
        for c in runs:
            if c[c.index("--out") + 1] == str(tmp_path / group) and c[c.index("--folds") + 1] == str(fold):
                found += c[c.index("--rows") + 1 :]
        return sorted(found)

    main = sorted(["dedn", "object", "scenario", "pfenet", "hsnet", "bam", "hdmnet", "proto", "prior"])
    ablations = ["dedn", "dedn w/o Scenario Normalization", "dedn w/o Object Continuity Guidance"]
    ablations += ["dedn w/o contrastive term", "dedn w/o positive-guided KL", "dedn, PKL correct-teacher"]
    for fold in range(4):
        assert rows("main-1shot", fold) == main and rows("main-5shot", fold) == main
        assert rows("ablations", fold) == sorted(ablations)
    # every planned row is one the table runner knows (its --rows choices)
    assert set(main + ablations) <= set(load_script("pascal_table").ROWS)
    for c in runs:
        group = Path(c[c.index("--out") + 1]).name
        assert c[c.index("--shots") + 1] == ("5" if group == "main-5shot" else "1")
        assert ("--train-shots" in c) == (group == "main-5shot")
        assert ("eval.seeds=[0]" in c) == (group == "ablations")
    # trained runs start before the training-free ones, 5-shot trainings (the longest) first
    first_free = next(i for i, c in enumerate(runs) if "proto" in c)
    assert all("proto" in c for c in runs[first_free:])
    assert "main-5shot" in runs[0][runs[0].index("--out") + 1] and "hsnet" in runs[0]  # the costliest


def test_whole_table_driver_runs_a_table_and_reports_a_failed_run(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    args = ["--config", str(REPO / "configs" / "synthetic.yaml"), "--folds", "0", "--groups", "main-1shot"]
    out = run_script("pascal_all.py", *args, "--root", str(tmp_path / "ok"), "--jobs", "2", *sets)
    records = json.loads((tmp_path / "ok" / "main-1shot" / "table.json").read_text())
    assert sorted(r["row"] for r in records) == sorted(
        ["dedn", "object", "scenario", "pfenet", "hsnet", "bam", "hdmnet", "proto", "prior"]
    )
    assert "| dedn |" in (tmp_path / "ok" / "main-1shot" / "table.md").read_text()
    # dedn, object, scenario and the four peers one run each; proto and prior in one run
    assert out.count("done in") == 8
    # a failed run is named with its log, and no table is collected from a group with a failed run
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pascal_all.py"), *args, "--root", str(tmp_path / "bad")]
        + [*sets, "--set", "model.no_such_key=1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "8 run(s) failed" in done.stderr and "000.log" in done.stderr
    assert "no_such_key" in (tmp_path / "bad" / "logs" / "000.log").read_text()
    assert not (tmp_path / "bad" / "main-1shot" / "table.json").exists()


def test_store_drift_finds_a_store_that_this_machine_would_not_encode_the_same(tmp_path, capsys):
    import numpy as np

    from dedn.cli import main as dedn

    config = str(REPO / "configs" / "synthetic.yaml")
    sets = [a for s in [*TINY, f"feature_store={tmp_path / 'store'}"] for a in ("--set", s)]
    assert dedn(["features", config, "--quiet", *sets]) == 0
    drift = load_script("store_drift")
    # encoded here, just now: the fresh encoding is bit-identical
    assert drift.main([config, "--images", "2", "--strict", *sets]) == 0
    out = capsys.readouterr().out
    assert "largest difference over 2 images 0" in out and '"cpu_capability"' in out
    # a store whose features differ in their last bits, as another machine's would
    (folder,) = list((tmp_path / "store").iterdir())
    mid = np.load(folder / "mid.npy", mmap_mode="r+")
    mid[0] += 1e-5
    mid.flush()
    del mid
    assert drift.main([config, "--images", "2", "--strict", *sets]) == 1
    assert "largest difference over 2 images 1e-05" in capsys.readouterr().out


def test_store_drift_names_a_bad_config_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "store_drift.py"), str(bad)], capture_output=True, text=True
    )
    assert done.returncode != 0 and "bad.yaml" in done.stderr and "Traceback" not in done.stderr


def test_query_cost_benchmark_prints_each_setting_and_both_ratios():
    stdout = shipped_model_benchmark("query_cost", "--queries", "2")
    rows = {line.split("median")[0].strip(): line for line in stdout.splitlines() if "median" in line}
    assert list(rows) == [
        "backbone pass",
        "DEDN predict",
        "proto predict",
        "2 x predict",
        "predict_classes (2)",
    ]
    assert all(float(r.split("median")[1].split()[0]) > 0 for r in rows.values())
    assert "DEDN predict / backbone pass:" in stdout and "2 classes at once / 2 one-class predicts:" in stdout


def test_presence_check_records_every_way_and_prints_the_separations(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    config = str(REPO / "configs" / "synthetic.yaml")
    train = [
        sys.executable,
        "-m",
        "dedn.cli",
        "train",
        config,
        "--quiet",
        "--output",
        str(tmp_path / "m"),
        *sets,
    ]
    assert subprocess.run(train, capture_output=True, cwd=REPO).returncode == 0
    ckpt = str(tmp_path / "m" / "checkpoints" / "last.pt")
    for flag, name in (("--val", "val.json"), ("--set=eval.missing_class=skip", "test.json")):
        out = run_script(
            "presence_check.py",
            config,
            "--checkpoint",
            ckpt,
            flag,
            "--episodes",
            "6",
            "--out",
            str(tmp_path / name),
            *sets,
        )
        rows = json.loads((tmp_path / name).read_text())
        assert len(rows) == 12 and [r["way"] for r in rows] == [0, 1] * 6
        assert all(r["painted_in_map"] <= r["painted"] for r in rows)  # the label map only takes pixels away
        assert all(r["present"] > 0 for r in rows[::2])  # the first way's query shows its class
        assert "12 ways:" in out and "AUC of top:" in out and "two-way label map" in out


def test_table_runner_chooses_each_rows_length_on_pseudo_novel_validation(tmp_path):
    tiny = [s for s in TINY if not s.startswith(("train.steps=", "train.val_every="))]
    sets = [a for s in tiny for a in ("--set", s)]
    args = ["--config", str(REPO / "configs" / "synthetic.yaml"), "--folds", "0", "--shots", "1"]
    length = ["--length", "pseudo-novel", "--length-classes", "6", "7"]
    length += ["--length-cap", "6", "--length-every", "2"]
    run_script("pascal_table.py", *args, "--rows", "dedn", "proto", "--out", str(tmp_path), *length, *sets)
    chosen = json.loads((tmp_path / "lengths.json").read_text())
    assert list(chosen) == ["dedn"]  # the training-free row has no length to choose
    curve = {int(s): v for s, v in chosen["dedn"]["curve"].items()}
    assert sorted(curve) == [2, 4, 6] and chosen["dedn"]["held_out_classes"] == [6, 7]
    # the earliest step of the best validation
    best = max(curve.values())
    assert chosen["dedn"]["steps"] == min(s for s, v in curve.items() if v == best)
    # the length run held the classes out of training; the row's model trains on every base class for
    # the chosen number of steps, validated once at the end
    search = load_config(next((tmp_path / "length" / "models").iterdir()) / "config.yaml")
    assert search.data.val_classes == [6, 7] and search.train.steps == 6
    (model,) = (tmp_path / "models").iterdir()
    final = load_config(model / "config.yaml")
    assert final.data.val_classes is None
    assert final.train.steps == final.train.val_every == chosen["dedn"]["steps"]
    record = next(r for r in json.loads((tmp_path / "table.json").read_text()) if r["row"] == "dedn")
    assert Path(record["checkpoint"]).parents[1] == model
    # the length is the script's to choose: a fixed one is refused, with a message
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pascal_table.py"), *args, "--rows", "dedn"]
        + ["--out", str(tmp_path), *length, *sets, "--set", "train.steps=3"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "drop --set train.steps=3" in done.stderr


def test_length_search_sizes_bams_base_learner_for_the_classes_left():
    table = load_script("pascal_table")
    config = REPO / "configs" / "pascal_offline.yaml"
    bam = table.search_settings(table.METHODS["bam"], config, [], [7, 10, 12, 18], 4000, 250)
    assert bam == [
        "data.val_classes=[7,10,12,18]",
        "train.steps=4000",
        "train.val_every=250",
        "model.bam.base_classes=11",
    ]
    # every other method only holds the classes out and sets the length
    assert table.search_settings(table.METHODS["pfenet"], config, [], [7, 10], 400, 50) == [
        "data.val_classes=[7,10]",
        "train.steps=400",
        "train.val_every=50",
    ]
    # the BAM search's settings load as a config
    load_config(config, ["model.method=bam", *bam])


def test_table_runner_resumes_a_training_that_stopped_part_way(tmp_path, monkeypatch):
    table = load_script("pascal_table")
    calls = []
    monkeypatch.setattr(table, "dedn", lambda *args: calls.append(args) or 12.0)
    sets = ["model.method=dedn"]
    run = tmp_path / "models" / f"{table.slug(sets)}-fold0"
    # a first call trains from the start
    table.train_model(sets, 0, tmp_path, [])
    assert "--resume" not in calls[0]
    # a run stopped part-way has its last checkpoint but no times.json (written only at the end)
    (run / "times.json").unlink()
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    _, seconds = table.train_model(sets, 0, tmp_path, [])
    args = list(calls[1])
    assert args[args.index("--resume") + 1] == str(run / "checkpoints" / "last.pt")
    assert seconds == 12.0 and json.loads((run / "times.json").read_text())["resumed"] is True


def test_a_peers_row_is_trained_with_its_own_configs_recipe(tmp_path, monkeypatch):
    table = load_script("pascal_table")
    skip = ("name", "output_dir")

    def settings(path, sets=()):
        return {k: v for k, v in flatten(to_dict(load_config(path, list(sets)))).items() if k not in skip}

    # the table config + a peer's row + its recipe resolves to exactly the peer's own config
    for name, own in table.OWN_CONFIGS.items():
        rebuilt = settings(table.CONFIG, [*table.METHODS[name].train, *table.recipe(name)])
        assert rebuilt == settings(own), name
    assert table.recipe("dedn") == [] and "train.optimizer=adam" in table.recipe("hsnet")

    seen = {}

    def fake_row(name, row, fold, shots, out, extra, config, train_shots):
        seen[name] = (row.train, extra)
        return {"miou": {"mean": 0.5}, "eval_seconds": 1.0}

    def fake_length(name, row, out, extra, config, classes, cap, every):
        seen[f"{name} search"] = extra
        return 100

    monkeypatch.setattr(table, "run_row", fake_row)
    monkeypatch.setattr(table, "choose_length", fake_length)
    monkeypatch.setattr(table, "collect", lambda out: [])

    def run(*argv):
        seen.clear()
        common = ["pascal_table.py", "--folds", "0", "--shots", "1", "--out", str(tmp_path)]
        monkeypatch.setattr(sys, "argv", [*common, "--methods", "hsnet", "dedn", *argv])
        table.main()
        return dict(seen)

    # with the table config: the peer's recipe, then every --set (which wins); DEDN has none
    rows = run("--set", "train.lr=0.5")
    assert rows["hsnet"][1] == [*table.recipe("hsnet"), "train.lr=0.5"]
    assert rows["dedn"][1] == ["train.lr=0.5"]
    # with another base config (say the synthetic one of the tests) only if asked for; never with config
    synthetic = str(REPO / "configs" / "synthetic.yaml")
    assert run("--config", synthetic)["hsnet"][1] == []
    assert run("--config", synthetic, "--recipe", "own")["hsnet"][1] == table.recipe("hsnet")
    assert run("--recipe", "config")["hsnet"][1] == []
    # a length search keeps the recipe's optimizer but not its length: the length is the search's
    rows = run("--length", "pseudo-novel")
    assert "train.optimizer=adam" in rows["hsnet search"]
    assert not any(s.startswith(("train.steps=", "train.val_every=")) for s in rows["hsnet search"])
    assert rows["hsnet"][0][-2:] == ["train.steps=100", "train.val_every=100"]
    assert rows["hsnet"][1] == rows["hsnet search"]
