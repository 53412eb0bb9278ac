"""Argument checks shared by the public ops: a wrong shape, dtype or device fails here, with a message that says
what was expected, not deep inside a kernel."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(op: str, name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating-point tensor (fp16, bf16, fp32, fp64), got {t.dtype}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` (None allowed) has ``ref``'s device and dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device"
            )
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but {ref_name} is {ref.dtype}; cast them to one dtype")


def check_index(op: str, name: str, t: torch.Tensor, ndim: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{op}: {name} must be an int32/int64 tensor with {ndim} dimensions, got {t.dtype} {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the data is on {device}")


def check_canvas(op: str, height: int, width: int, brick_size: int, field_size: int) -> None:
    if brick_size <= 0 or field_size <= 0 or brick_size % field_size:
        raise ValueError(f"{op}: brick size {brick_size} must be a positive multiple of the field size {field_size}")
    if height <= 0 or width <= 0:
        raise ValueError(f"{op}: the canvas {height}x{width} has no pixels; give sides of at least {brick_size}")
    if height % brick_size or width % brick_size:
        raise ValueError(
            f"{op}: the canvas {height}x{width} is not divisible by the brick size {brick_size}; "
            f"use a height and width that are multiples of {brick_size}"
        )


def _no_values(t: torch.Tensor) -> bool:
    """Whether a check must not read t's values: none there (empty, meta), or reading them would break a trace
    (torch.compile: a data-dependent branch; CUDA graph capture: a host sync is not allowed)."""
    if torch.compiler.is_compiling() or t.numel() == 0 or t.is_meta:
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_patch_ids(op: str, patch_index: torch.Tensor, num_patches: int) -> None:
    """Each row of patch_index [B, P] lists distinct flat patch ids in [0, num_patches).

    The kernels trust this (an id out of range would embed zeros or land in another image; a repeated one leaves the
    gradient to whichever sequence came last), so it is checked here: one host sync on a GPU. Skipped where the values
    cannot be read (_no_values).
    """
    if _no_values(patch_index):
        return
    outside = (patch_index < 0) | (patch_index >= num_patches)
    ids = patch_index.sort(dim=1).values
    repeated = ids[:, 1:] == ids[:, :-1]
    any_outside, any_repeated = torch.stack([outside.any(), repeated.any()]).tolist()
    if any_outside:
        bad = patch_index[outside][0].item()
        raise ValueError(
            f"{op}: patch_index holds {bad}, outside 0..{num_patches - 1}; give flat patch ids p * (W / r) + q of "
            f"the {num_patches} patches"
        )
    if any_repeated:
        row, col = (int(i) for i in repeated.nonzero()[0])
        raise ValueError(f"{op}: patch_index row {row} lists patch {ids[row, col].item()} twice; list each patch once")


def check_image_ids(op: str, image_index: torch.Tensor, num_images: int) -> None:
    """Every entry of image_index lies in [0, num_images): the fused kernels index the per-image vectors with it
    unchecked. One host sync on a GPU; skipped where the values cannot be read (_no_values)."""
    if _no_values(image_index):
        return
    outside = (image_index < 0) | (image_index >= num_images)
    if outside.any():
        raise ValueError(
            f"{op}: image_index holds {image_index[outside][0].item()}, outside 0..{num_images - 1} (the per-image "
            f"vectors have {num_images} rows); give each sequence the row of its image"
        )
