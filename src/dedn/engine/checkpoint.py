"""Checkpoints: ``{model, optimizer, scheduler, step, config, rng}`` written atomically.

Only the trainable part of the model is stored (the frozen backbone comes from its own weights), so a
checkpoint is small; loading checks that the checkpoint was made for the same model configuration.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from dedn.config import Config, apply_override, config_from_dict, flatten, to_dict
from dedn.errors import CheckpointError, ConfigError
from dedn.utils.io import atomic_write, hash_file

#: model settings a checkpoint must agree on: all of them except these, which change neither the
#: parameters nor what they mean (the backbone's weight file, and the test-time fusion and baselines,
#: so that e.g. plain averaging can be scored with a model trained with AWF, and HSNet's K-shot mode)
_MODEL_KEYS_IGNORED = (
    "model.weights",
    "model.fusion.mode",
    "model.fusion.temperature",
    "model.fusion.confidence",
    "model.fusion.matcher",
    "model.fusion.support_pass",
    "model.fusion.resolution",
    "model.fusion.score",
    "model.hsnet.shot_mode",
)
_MODEL_PREFIXES_IGNORED = ("model.baseline.", "model.fusion.probe.")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable dedn checkpoint ({type(e).__name__}: {first_line})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a dedn checkpoint (expected keys 'model' and 'config')")
    if not isinstance(state["config"], dict):
        raise CheckpointError(
            f"{path}: its 'config' entry is a {type(state['config']).__name__}, not a mapping of settings"
        )
    weights = state["model"]
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise CheckpointError(f"{path}: its 'model' entry is not a mapping of weight names to tensors")
    return state


#: model settings added after checkpoints existed, with the value that reproduces the older models
_LEGACY_MODEL_DEFAULTS = {"head_inputs": "features"}


def is_test_time_setting(key: str) -> bool:
    """Whether the model setting ``key`` (``model.fusion.matcher``) may differ from a checkpoint's: it
    changes neither the parameters nor what they mean (the test-time fusion, the baselines)."""
    return key in _MODEL_KEYS_IGNORED or key.startswith(_MODEL_PREFIXES_IGNORED)


def checkpoint_config(
    state: dict[str, Any], path: str | Path, test_time: dict[str, Any] | None = None
) -> Config:
    """The run config saved in a checkpoint; ``test_time``: test-time model settings that replace the
    saved ones (``{"model.fusion.matcher": "probe"}``; any other setting is refused)."""
    saved = copy.deepcopy(state["config"])
    model = saved.get("model")
    if isinstance(model, dict):
        saved = {**saved, "model": {**_LEGACY_MODEL_DEFAULTS, **model}}
    for key, value in (test_time or {}).items():
        if not is_test_time_setting(key):
            raise CheckpointError(
                f"{path}: {key} is not a test-time setting; only the fusion and baseline settings can "
                "differ from the checkpoint's"
            )
        apply_override(saved, f"{key}={json.dumps(value)}")
    try:
        return config_from_dict(saved)
    except ConfigError as e:
        raise CheckpointError(
            f"{path}: its saved config is not valid for this version of dedn ({e})"
        ) from None


def _model_differences(
    a: Config, b: Config, keys_ignored: tuple[str, ...], prefixes_ignored: tuple[str, ...]
) -> tuple[list[str], dict, dict]:
    """The flattened model settings (``model.x.y``) on which ``a`` and ``b`` differ, except the ignored
    ones, and both flattened settings."""
    fa = flatten(to_dict(a.model), "model")
    fb = flatten(to_dict(b.model), "model")
    diff = [
        k for k in fa if k not in keys_ignored and not k.startswith(prefixes_ignored) and fa[k] != fb.get(k)
    ]
    return diff, fa, fb


def check_compatible(saved: Config, current: Config, path: str | Path) -> None:
    """Raise if the checkpoint's model settings differ from the current config's."""
    diff, a, b = _model_differences(saved, current, _MODEL_KEYS_IGNORED, _MODEL_PREFIXES_IGNORED)
    if diff:
        detail = "; ".join(f"{k}: checkpoint {a[k]!r}, config {b.get(k)!r}" for k in diff[:6])
        raise CheckpointError(
            f"{path} was trained with another model configuration ({detail}); "
            "use the config the checkpoint was trained with"
        )


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load the trainable weights strictly; the frozen backbone comes from its own weights."""
    from dedn.models.backbones import load_strict

    load_strict(model, state, path, "the model", allow_missing=lambda key: key.startswith("backbone."))


def load_trained_model(cfg, checkpoint: str | None, device):
    """The model of ``cfg`` with the weights of ``checkpoint`` (checked to be the same configuration)."""
    from dedn.models.network import FewShotSegmenter

    model = FewShotSegmenter(cfg.model)
    digest = None
    if checkpoint:
        if not model.trainable:
            raise CheckpointError(
                f"model.method = {cfg.model.method} is training-free and takes no checkpoint"
            )
        state = load_checkpoint(checkpoint)
        check_compatible(checkpoint_config(state, checkpoint), cfg, checkpoint)
        load_model_state(model, state["model"], checkpoint)
        digest = file_sha256(checkpoint)
    elif model.trainable:
        raise CheckpointError(f"model.method = {cfg.model.method} must be trained: pass --checkpoint")
    return model.to(device).eval(), digest


def file_sha256(path: str | Path) -> str:
    return hash_file(path, hashlib.sha256()).hexdigest()


#: model settings the two experts of an assembled DEDN may differ in: their own expert's settings, and
#: what assembling sets (the method, the reduction layout, the fusion)
_ASSEMBLE_KEYS_FREE = ("model.method", "model.reduce", "model.weights")
_ASSEMBLE_PREFIXES_FREE = ("model.object.", "model.scenario.", "model.fusion.", "model.baseline.")


def assemble_experts(object_path: str | Path, scenario_path: str | Path) -> dict[str, Any]:
    """A DEDN checkpoint made of an ``object`` model and a ``scenario`` model trained apart.

    Each expert keeps its own reduction layer (``model.reduce = per_expert``); there is no trained fusion
    gate (``model.fusion.gate = false``), so the result is scored with AWF (the default), cycle or mean.
    The two checkpoints must agree on every other model setting (backbone, levels, channels, ...).
    """
    parts = {}
    for method, path in (("object", object_path), ("scenario", scenario_path)):
        state = load_checkpoint(path)
        cfg = checkpoint_config(state, path)
        if cfg.model.method != method:
            raise CheckpointError(
                f"{path}: expected a model trained with model.method = {method}, got {cfg.model.method}"
            )
        parts[method] = (Path(path), state, cfg)
    diff, a, b = _model_differences(
        parts["object"][2], parts["scenario"][2], _ASSEMBLE_KEYS_FREE, _ASSEMBLE_PREFIXES_FREE
    )
    if diff:
        detail = "; ".join(f"{k}: {a[k]!r} and {b.get(k)!r}" for k in diff[:6])
        raise CheckpointError(
            f"{object_path} and {scenario_path} were trained with different model settings ({detail})"
        )
    cfg = copy.deepcopy(parts["object"][2])
    cfg.model.method = "dedn"
    cfg.model.reduce = "per_expert"
    cfg.model.scenario = parts["scenario"][2].model.scenario
    cfg.model.fusion.gate = False
    model: dict[str, torch.Tensor] = {}
    for method, (path, state, part_cfg) in parts.items():
        shared = part_cfg.model.reduce == "shared"
        for key, value in state["model"].items():
            if key.startswith("reduce.") and shared:
                key = f"reduce.{method}.{key[len('reduce.') :]}"
            if not key.startswith((f"reduce.{method}.", f"experts.{method}.")):
                raise CheckpointError(f"{path}: unexpected weight '{key}' in a {method} model")
            model[key] = value
    return {
        "model": model,
        "config": to_dict(cfg),
        "assembled_from": {m: {"path": str(p), "sha256": file_sha256(p)} for m, (p, _, _) in parts.items()},
        "version": 1,
    }
