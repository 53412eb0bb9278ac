"""Torch-tensor face of the CUDA extension ``lego_kernels._C`` (csrc/): same tensors in, same tensors out as the
Triton launchers, so a custom op can call either (the contract is in the docstrings of ``adaln.py`` and
``short_attention.py``):

- ``adaln_modulate_fwd(x, shift, scale, image_index) -> (y, mean, rstd)``
- ``adaln_modulate_bwd(dy, x, shift, scale, image_index, mean, rstd) -> (dx, dshift, dscale)``
- ``gated_residual_adaln_fwd(x, y, gate, shift, scale, image_index) -> (x_out, h, mean, rstd)``
- ``gated_residual_adaln_bwd(dx_out, dh, x_out, y, gate, scale, image_index, mean, rstd)
  -> (dx, dy, dgate, dshift, dscale)``
- ``short_attention_fwd(qkv, num_heads) -> (o, lse)``
- ``short_attention_bwd(do, qkv, o, lse, num_heads) -> dqkv``

x, y [N, S, d]; shift, scale, gate [B, d]; image_index int64 [N] or None; mean, rstd fp32 [N * S]; qkv [N, S, 3d];
o [N, S, d]; lse fp32 [N, H, S]. Floating-point tensors are fp32, fp16 or bf16, all of one dtype, on one CUDA device,
contiguous (gradients coming from autograd are made contiguous here; other inputs must already be). Outputs come from
``new_output``; the kernels run on the current stream of the tensors' device.

The extension takes raw pointers, so nothing here is traced by autograd: these functions are the bodies of the
``torch.library`` custom ops, which own the autograd and fake-tensor rules.
"""

from __future__ import annotations

import torch

from lego_kernels._dispatch import cuda_extension, new_output

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# A CPU build of the same kernel source (csrc/emu/cuda_emu.h, built by tests/test_cuda_ext.py) that runs these
# wrappers on CPU tensors, so the kernels are checked on machines without a GPU. None outside those tests.
_cpu_emulator = None


def _backend(op: str, device: torch.device):
    """(extension module, device index, stream handle) for tensors on ``device``."""
    if device.type == "cuda":
        ext = cuda_extension()
        if ext is None:
            raise RuntimeError(
                f"{op}: the CUDA extension lego_kernels._C is not built; reinstall with nvcc on PATH "
                "(and LEGO_SKIP_CUDA_BUILD unset), or use backend='triton' / 'torch'"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        return ext, index, torch.cuda.current_stream(index).cuda_stream
    if device.type == "cpu" and _cpu_emulator is not None:
        return _cpu_emulator, 0, 0
    raise ValueError(f"{op}: the CUDA kernels take CUDA tensors, got tensors on {device}")


def _dtype_code(op: str, t: torch.Tensor) -> int:
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{op}: the CUDA kernels take fp32, fp16 or bf16 tensors, got {t.dtype} (use backend='torch')")
    return _DTYPE_CODES[t.dtype]


def _tensor(op, name, t, like, shape, dtype=None, grad=False):
    """``t`` checked against ``like``'s device, ``dtype`` (default: like's) and ``shape``; contiguous.

    Gradients (grad=True) may arrive strided or expanded from autograd: those are made contiguous. Any other input
    must be contiguous already, since a silent copy there would hide a layout bug upstream.
    """
    dtype = like.dtype if dtype is None else dtype
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other tensors are on {like.device}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} is {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        if not grad:
            raise ValueError(f"{op}: {name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")
        t = t.contiguous()
    return t


def _image_index(op, image_index, num_seq, like):
    if image_index is None:
        return None
    if not isinstance(image_index, torch.Tensor) or image_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: image_index must be an int64 tensor or None")
    if image_index.device != like.device:
        raise ValueError(f"{op}: image_index is on {image_index.device} but the data is on {like.device}")
    if tuple(image_index.shape) != (num_seq,):
        raise ValueError(f"{op}: image_index has shape {tuple(image_index.shape)}, expected ({num_seq},)")
    return image_index.to(torch.int64).contiguous()


def _image_order(index: torch.Tensor | None) -> torch.Tensor | None:
    """The backward's view of image_index: int64 [2, N], the images sorted (stably) and the sequence at each sorted
    position, so that the kernel walks each image's rows as one run and sums them without atomics (csrc/adaln.cu)."""
    if index is None:
        return None
    sorted_image, order = torch.sort(index, stable=True)
    return torch.stack([sorted_image, order])


def _workspace(ext, kinds: int, num_images: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """The backward's scratch for per-block, per-image partial sums (csrc/launchers.h); needs no clearing."""
    slots = ext.ADALN_BACKWARD_MAX_BLOCKS + num_images
    return torch.empty((kinds, slots, d), dtype=torch.float32, device=like.device)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """The attention kernels read and write 16-byte packs: a view that starts mid-allocation gets copied."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _dims(op, x):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{op}: expected a 3-d tensor [N, S, d], got {getattr(x, 'shape', type(x).__name__)}")
    return tuple(x.shape)


def _vec_dims(op, name, v, d):
    if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[1] != d:
        raise ValueError(f"{op}: {name} must be [B, {d}], got {tuple(getattr(v, 'shape', ()))}")
    return v.shape[0]


# ---- adaLN ----------------------------------------------------------------------------------------------------------


def adaln_modulate_fwd(x, shift, scale, image_index):
    op = "adaln_modulate_fwd"
    n, s, d = _dims(op, x)
    b = _vec_dims(op, "shift", shift, d)
    code = _dtype_code(op, x)
    ext, device, stream = _backend(op, x.device)
    x = _tensor(op, "x", x, x, (n, s, d))
    shift = _tensor(op, "shift", shift, x, (b, d))
    scale = _tensor(op, "scale", scale, x, (b, d))
    index = _image_index(op, image_index, n, x)
    y = new_output((n, s, d), x.dtype, x.device)
    mean = new_output((n * s,), torch.float32, x.device)
    rstd = new_output((n * s,), torch.float32, x.device)
    if n > 0:
        ext.adaln_modulate_fwd(
            x.data_ptr(), shift.data_ptr(), scale.data_ptr(), _ptr(index), y.data_ptr(), mean.data_ptr(),
            rstd.data_ptr(), n, s, d, b, code, device, stream,
        )  # fmt: skip
    return y, mean, rstd


def adaln_modulate_bwd(dy, x, shift, scale, image_index, mean, rstd):
    op = "adaln_modulate_bwd"
    n, s, d = _dims(op, x)
    b = _vec_dims(op, "shift", shift, d)
    code = _dtype_code(op, x)
    ext, device, stream = _backend(op, x.device)
    x = _tensor(op, "x", x, x, (n, s, d))
    dy = _tensor(op, "dy", dy, x, (n, s, d), grad=True)
    _tensor(op, "shift", shift, x, (b, d))
    scale = _tensor(op, "scale", scale, x, (b, d))
    mean = _tensor(op, "mean", mean, x, (n * s,), dtype=torch.float32)
    rstd = _tensor(op, "rstd", rstd, x, (n * s,), dtype=torch.float32)
    index = _image_index(op, image_index, n, x)
    if n == 0:
        zeros = torch.zeros((b, d), dtype=x.dtype, device=x.device)
        return torch.empty_like(x), zeros, zeros.clone()
    dx = new_output((n, s, d), x.dtype, x.device)
    dshift = new_output((b, d), x.dtype, x.device)
    dscale = new_output((b, d), x.dtype, x.device)
    workspace, image_order = _workspace(ext, 2, b, d, x), _image_order(index)  # both alive through the call
    ext.adaln_modulate_bwd(
        dy.data_ptr(), x.data_ptr(), scale.data_ptr(), _ptr(image_order), mean.data_ptr(), rstd.data_ptr(),
        dx.data_ptr(), dshift.data_ptr(), dscale.data_ptr(), workspace.data_ptr(), n, s, d, b, code, device, stream,
    )  # fmt: skip
    return dx, dshift, dscale


def gated_residual_adaln_fwd(x, y, gate, shift, scale, image_index):
    op = "gated_residual_adaln_fwd"
    n, s, d = _dims(op, x)
    b = _vec_dims(op, "gate", gate, d)
    code = _dtype_code(op, x)
    ext, device, stream = _backend(op, x.device)
    x = _tensor(op, "x", x, x, (n, s, d))
    y = _tensor(op, "y", y, x, (n, s, d))
    gate = _tensor(op, "gate", gate, x, (b, d))
    shift = _tensor(op, "shift", shift, x, (b, d))
    scale = _tensor(op, "scale", scale, x, (b, d))
    index = _image_index(op, image_index, n, x)
    x_out = new_output((n, s, d), x.dtype, x.device)
    h = new_output((n, s, d), x.dtype, x.device)
    mean = new_output((n * s,), torch.float32, x.device)
    rstd = new_output((n * s,), torch.float32, x.device)
    if n > 0:
        ext.gated_residual_adaln_fwd(
            x.data_ptr(), y.data_ptr(), gate.data_ptr(), shift.data_ptr(), scale.data_ptr(), _ptr(index),
            x_out.data_ptr(), h.data_ptr(), mean.data_ptr(), rstd.data_ptr(), n, s, d, b, code, device, stream,
        )  # fmt: skip
    return x_out, h, mean, rstd


def gated_residual_adaln_bwd(dx_out, dh, x_out, y, gate, scale, image_index, mean, rstd):
    op = "gated_residual_adaln_bwd"
    n, s, d = _dims(op, x_out)
    b = _vec_dims(op, "gate", gate, d)
    code = _dtype_code(op, x_out)
    ext, device, stream = _backend(op, x_out.device)
    x_out = _tensor(op, "x_out", x_out, x_out, (n, s, d))
    dx_out = _tensor(op, "dx_out", dx_out, x_out, (n, s, d), grad=True)
    dh = _tensor(op, "dh", dh, x_out, (n, s, d), grad=True)
    y = _tensor(op, "y", y, x_out, (n, s, d))
    gate = _tensor(op, "gate", gate, x_out, (b, d))
    scale = _tensor(op, "scale", scale, x_out, (b, d))
    mean = _tensor(op, "mean", mean, x_out, (n * s,), dtype=torch.float32)
    rstd = _tensor(op, "rstd", rstd, x_out, (n * s,), dtype=torch.float32)
    index = _image_index(op, image_index, n, x_out)
    if n == 0:
        zeros = torch.zeros((b, d), dtype=x_out.dtype, device=x_out.device)
        return torch.empty_like(x_out), torch.empty_like(x_out), zeros, zeros.clone(), zeros.clone()
    dx = new_output((n, s, d), x_out.dtype, x_out.device)
    dy = new_output((n, s, d), x_out.dtype, x_out.device)
    dgate = new_output((b, d), x_out.dtype, x_out.device)
    dshift = new_output((b, d), x_out.dtype, x_out.device)
    dscale = new_output((b, d), x_out.dtype, x_out.device)
    workspace, image_order = _workspace(ext, 3, b, d, x_out), _image_order(index)  # both alive through the call
    ext.gated_residual_adaln_bwd(
        dx_out.data_ptr(), dh.data_ptr(), x_out.data_ptr(), y.data_ptr(), gate.data_ptr(), scale.data_ptr(),
        _ptr(image_order), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), dy.data_ptr(), dgate.data_ptr(),
        dshift.data_ptr(), dscale.data_ptr(), workspace.data_ptr(), n, s, d, b, code, device, stream,
    )  # fmt: skip
    return dx, dy, dgate, dshift, dscale


# ---- short attention ------------------------------------------------------------------------------------------------


def _attention_dims(op, qkv, num_heads):
    n, s, three_d = _dims(op, qkv)
    if num_heads <= 0 or three_d % (3 * num_heads):
        raise ValueError(f"{op}: qkv's last dimension {three_d} is not 3 * num_heads ({num_heads}) * head size")
    d = three_d // 3
    return n, s, d, d // num_heads


def short_attention_fwd(qkv, num_heads):
    op = "short_attention_fwd"
    n, s, d, head_dim = _attention_dims(op, qkv, num_heads)
    code = _dtype_code(op, qkv)
    ext, device, stream = _backend(op, qkv.device)
    qkv = _aligned(_tensor(op, "qkv", qkv, qkv, (n, s, 3 * d)))
    o = new_output((n, s, d), qkv.dtype, qkv.device)
    lse = new_output((n, num_heads, s), torch.float32, qkv.device)
    if n > 0:
        ext.short_attention_fwd(
            qkv.data_ptr(), o.data_ptr(), lse.data_ptr(), n, s, num_heads, head_dim, code, device, stream
        )
    return o, lse


def short_attention_bwd(do, qkv, o, lse, num_heads):
    op = "short_attention_bwd"
    n, s, d, head_dim = _attention_dims(op, qkv, num_heads)
    code = _dtype_code(op, qkv)
    ext, device, stream = _backend(op, qkv.device)
    qkv = _aligned(_tensor(op, "qkv", qkv, qkv, (n, s, 3 * d)))
    do = _aligned(_tensor(op, "do", do, qkv, (n, s, d), grad=True))
    o = _aligned(_tensor(op, "o", o, qkv, (n, s, d)))
    lse = _tensor(op, "lse", lse, qkv, (n, num_heads, s), dtype=torch.float32)
    dqkv = new_output((n, s, 3 * d), qkv.dtype, qkv.device)
    if n > 0:
        ext.short_attention_bwd(
            do.data_ptr(), qkv.data_ptr(), o.data_ptr(), lse.data_ptr(), dqkv.data_ptr(), n, s, num_heads, head_dim,
            code, device, stream,
        )  # fmt: skip
    return dqkv
