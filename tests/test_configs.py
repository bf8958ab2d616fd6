"""Every shipped config parses (unknown keys would be errors) and names a valid benchmark setting."""

from pathlib import Path

import pytest

from dedn.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.benchmark in {"synthetic", "pascal", "coco", "fss1000", "folders", "labelmap"}
    assert cfg.eval.episodes >= 1000 and len(cfg.eval.seeds) == 5


def test_the_cross_domain_config_scores_the_offline_pascal_checkpoints():
    """configs/camvid_cross.yaml must agree with configs/pascal_offline.yaml on every model setting that a
    checkpoint checks, or `dedn eval` would refuse the fold models there."""
    from dedn.engine.checkpoint import check_compatible

    repo = Path(__file__).resolve().parents[1]
    pascal = load_config(repo / "configs" / "pascal_offline.yaml")
    for name in ("camvid_cross", "ccp_cross"):
        cross = load_config(repo / "configs" / f"{name}.yaml")
        check_compatible(pascal, cross, "a model trained with configs/pascal_offline.yaml")
        assert cross.data.protocol == "cross" and cross.data.image_size == pascal.data.image_size
        assert cross.model.fusion == pascal.model.fusion  # the same test-time fusion everywhere


def test_every_row_of_the_table_runner_is_a_valid_config():
    """Each row of scripts/pascal_table.py (its training and its test-time overrides) loads on the
    table's config: a row that fails only reaches its error after the rows before it have run."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("pascal_table", repo / "scripts" / "pascal_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for name, row in table.ROWS.items():
        cfg = load_config(repo / "configs" / "pascal_offline.yaml", [*(row.train or []), *row.test])
        assert name.startswith(cfg.model.method), name
    assert load_config(None, ["loss.distill.mode=off"]).loss.distill.mode == "off"


def test_yaml_booleans_are_read_back_as_off_and_on_for_text_choices(tmp_path):
    # YAML 1.1 reads a bare off as false; the text setting gets the word back
    config = tmp_path / "c.yaml"
    config.write_text("loss:\n  distill:\n    mode: off\n")
    assert load_config(config).loss.distill.mode == "off"
    with pytest.raises(Exception, match="loss.distill.mode"):
        load_config(None, ["loss.distill.mode=on"])  # read back as "on", which is not a choice
