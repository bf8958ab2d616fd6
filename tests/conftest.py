import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEDN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache folder, so no test depends on what another one scanned."""
    monkeypatch.setenv("DEDN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def pascal_root() -> Path:
    root = SHARED_DATA / "pascal-voc2012-val"
    if not (root / "JPEGImages").is_dir():
        pytest.skip(f"real PASCAL data not found at {root} (set DEDN_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def coco_root() -> Path:
    root = SHARED_DATA / "coco-micro"
    if not (root / "annotations").is_dir():
        pytest.skip(f"real COCO micro data not found at {root} (set DEDN_SHARED_DATA)")
    return root
