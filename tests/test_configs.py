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
    assert cfg.data.benchmark in {"synthetic", "pascal", "coco", "fss1000", "folders"}
    assert cfg.eval.episodes >= 1000 and len(cfg.eval.seeds) == 5
