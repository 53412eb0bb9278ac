"""The checkpoint file: one safetensors file holding everything (model, EMA and optimizer tensors; both configs and the
step in its metadata), written atomically (lego.files.atomic_write), so a crash never leaves a half-written checkpoint
where the last good one was. ``config.json`` beside it is a readable copy of the metadata, written after it; nothing
reads it back, and ``sync_config_json`` (called when a run starts) rewrites it if a crash between the two writes left
it behind the checkpoint. A stack on a frozen base does not store the base's weights (they stay at their origin,
lego.checkpoints.build); building models from checkpoints is lego.checkpoints.build's.

Integrity: the metadata holds SHA-256 checksums of the metadata itself and of each group of tensors (model, EMA,
optimizer), checked by ``load_checkpoint`` for what it reads, so a flipped bit or an edited config is an error naming
the file, not a model that trains or samples on. Checkpoints written before checksums existed load as they did."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lego.errors import LegoError
from lego.files import atomic_write
from lego.networks.dit import DiTConfig
from lego.networks.registry import config_from_dict
from lego.networks.stack import LegoConfig

FORMAT = "lego-checkpoint-1"
PARTS = ("model", "ema", "optim")
_CHECKED_METADATA = ("format", "step", "model_config", "train_config", "param_groups")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        v = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _metadata_digest(metadata: dict) -> str:
    return hashlib.sha256(json.dumps([metadata.get(k) for k in _CHECKED_METADATA]).encode()).hexdigest()


def stored_checksums(path) -> dict[str, str]:
    """The checksums a checkpoint recorded ({} for one written before checksums), read from its metadata alone."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("checksums", "{}"))


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


@dataclass
class Checkpoint:
    model_config: LegoConfig | DiTConfig
    train_config: dict
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict | None


def save_checkpoint(path, model, ema, optimizer, step: int, train_config: dict) -> None:
    """Write a checkpoint of a model, its EMA copy and its optimizer; see ``write_checkpoint``."""
    write_checkpoint(path, model.config, model.state_dict(), ema.state_dict(), optimizer.state_dict(), step,
                     train_config)  # fmt: skip


def write_checkpoint(path, config, model_state: dict, ema_state: dict, opt_state: dict, step: int,
                     train_config: dict) -> None:  # fmt: skip
    """Write a checkpoint from state dicts (a model's ``config``, whose frozen base's weights are left out); refuses
    (LegoError, nothing written) when a weight or optimizer tensor is not finite, so a diverged run never replaces a
    good checkpoint. A failed write (OSError) leaves the old file as it was."""
    tensors = {f"model/{k}": v.detach().contiguous().cpu() for k, v in stored_state(config, model_state).items()}
    tensors.update({f"ema/{k}": v.detach().contiguous().cpu() for k, v in stored_state(config, ema_state).items()})
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optim/{idx}/{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    bad = non_finite(tensors)  # an AdamW exp_avg_sq that overflowed freezes its weights while they stay finite
    if bad:
        raise LegoError(
            f"not saving step {step} to {path}: {len(bad)} weight or optimizer tensors hold NaN or inf (first "
            f"{bad[0]}); the previous checkpoint is kept"
        )
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "model_config": json.dumps(config.to_dict()),
        "train_config": json.dumps(train_config),
        "param_groups": json.dumps(opt_state["param_groups"]),
    }
    checksums = {part: tensors_digest(_part(tensors, part)) for part in PARTS}
    metadata["checksums"] = json.dumps({"metadata": _metadata_digest(metadata), **checksums})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    write_config_json(path, step, config.to_dict(), train_config)


def write_config_json(path, step: int, model_config: dict, train_config: dict) -> None:
    config = {"step": step, "model": model_config, "train": train_config}
    atomic_write(Path(path).with_name("config.json"), lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def sync_config_json(path) -> None:
    """Rewrite config.json from the checkpoint ``path`` if it is missing or names another step (a crash between the
    checkpoint's rename and config.json's)."""
    path = Path(path)
    try:
        step = json.loads(path.with_name("config.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        step = None
    ckpt = load_checkpoint(path, parts=())
    if step != ckpt.step:
        write_config_json(path, ckpt.step, ckpt.model_config.to_dict(), ckpt.train_config)


def load_checkpoint(path, parts: tuple[str, ...] = ("model", "ema", "optim")) -> Checkpoint:
    """Read a checkpoint's configs and step, and of its tensors only the groups in ``parts`` ("model", "ema",
    "optim"; the others come back empty), so that sampling or reading the options does not load everything."""
    path = Path(path)
    if not path.is_file():
        raise LegoError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            wanted = [k for k in f.keys() if k.partition("/")[0] in parts]  # noqa: SIM118 -- not a dict
            tensors = {k: f.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError, ValueError) as e:
        raise LegoError(
            f"{path} is not a readable safetensors checkpoint ({e}); it may be corrupt or truncated"
        ) from None
    if metadata.get("format") != FORMAT:
        raise LegoError(f"{path} is a safetensors file but not a lego checkpoint (no '{FORMAT}' metadata)")
    _check_sums(path, metadata, tensors, parts)
    try:
        model_config = config_from_dict(json.loads(metadata["model_config"]))
        train_config = json.loads(metadata["train_config"])
        step = int(metadata["step"])
    except (KeyError, TypeError, ValueError) as e:
        raise LegoError(f"{path}: the checkpoint's metadata is damaged ({e})") from None
    groups: dict[str, dict] = {"model": {}, "ema": {}, "optim": {}}
    for key, value in tensors.items():
        head, _, rest = key.partition("/")
        groups[head][rest] = value
    optimizer = None
    if "optim" in parts and "param_groups" in metadata:
        state: dict[int, dict] = {}
        for key, value in groups["optim"].items():
            idx, _, name = key.partition("/")
            state.setdefault(int(idx), {})[name] = value
        optimizer = {"state": state, "param_groups": json.loads(metadata["param_groups"])}
    return Checkpoint(model_config, train_config, step, groups["model"], groups["ema"], optimizer)


def _part(tensors: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.partition("/")[0] == part}


def _check_sums(path, metadata: dict, tensors: dict[str, torch.Tensor], parts) -> None:
    """The recorded checksums of the metadata and of the tensor groups read (none recorded: an older checkpoint)."""
    try:
        recorded = json.loads(metadata.get("checksums", "{}"))
    except ValueError:
        recorded = {"metadata": "unreadable"}
    if not recorded:
        return
    damaged = [] if recorded.get("metadata") == _metadata_digest(metadata) else ["its metadata (the configs, step)"]
    for part in PARTS:
        if part in parts and recorded.get(part) != tensors_digest(_part(tensors, part)):
            damaged.append(f"its {part} tensors")
    if damaged:
        raise LegoError(
            f"{path}: {' and '.join(damaged)} do not match the checksum recorded when it was written: the file was "
            "damaged or edited since; use another checkpoint (lego.train keeps the ones before the newest as "
            "checkpoint-STEP.safetensors)"
        )


def check_finite(ckpt: Checkpoint, path) -> None:
    """--resume: every tensor of the checkpoint is finite (a NaN would stop the run as if it diverged, an infinite
    AdamW second moment would freeze its weights for good)."""
    tensors = {f"{part}/{k}": v for part in ("model", "ema") for k, v in getattr(ckpt, part).items()}
    for idx, state in (ckpt.optimizer or {}).get("state", {}).items():
        tensors.update({f"optim/{idx}/{k}": v for k, v in state.items()})
    bad = non_finite(tensors)
    if bad:
        raise LegoError(
            f"{path}: {len(bad)} of its tensors hold NaN or inf (first {bad[0]}), so the run cannot "
            "continue from it (the file is damaged, or the run went wrong before this save); start a new "
            "run in another --out"
        )


def load_weights(model, state: dict[str, torch.Tensor], path) -> None:
    """``model.load_state_dict(state)``, where a mismatch is a LegoError naming the first one: the checkpoint's config
    no longer describes its tensors (damaged, or written by another version)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]  # the first says "Error(s) in ..."
        first = (lines or [str(e)])[0].rstrip(".")
        first = first if len(first) <= 300 else first[:300] + "..."
        more = f"; {len(lines) - 1} more like it" if len(lines) > 1 else ""
        raise LegoError(
            f"{path}: the weights do not fit the model in its config ({first}{more}); the checkpoint is "
            "damaged or from another version of lego: use another checkpoint"
        ) from None


BASE_PREFIX = "net.bricks.0."  # a stack's brick 0: its pretrained base, when it has one


def base_is_frozen(config) -> bool:
    return bool(getattr(config, "base", None) and config.base.get("frozen"))


def stored_state(config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of a model's state dict a checkpoint holds: all of it but a frozen base's weights."""
    return {k: v for k, v in state.items() if not (base_is_frozen(config) and k.startswith(BASE_PREFIX))}


def with_base_weights(model, state: dict) -> dict:
    """A checkpoint's state dict completed with the frozen base's weights the model was built with."""
    if not base_is_frozen(model.config):
        return state
    return {**{BASE_PREFIX + k: v for k, v in model.net.bricks[0].state_dict().items()}, **state}
