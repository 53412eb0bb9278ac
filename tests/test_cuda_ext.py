"""The CUDA extension lego_kernels._C (csrc/) and its wrappers lego_kernels._cuda.

- On any machine: the module is built wherever nvcc is (CI included), imports without a GPU, and refuses cleanly
  (a Python RuntimeError, not a crash) when there is no GPU; its argument checks say what was wrong.
- Without a GPU: the same kernel source compiled for the CPU emulator (csrc/emu/cuda_emu.h, g++ -DLEGO_EMULATE) runs
  through the same wrappers and custom ops, held to the fp64 reference like the GPU.
- `cuda`-marked: every kernel on the GPU against the fp64 reference, forward and every gradient, fp32/fp16/bf16, odd
  and model shapes, image_index variants, directly and through the public ops with backend="cuda".

Pass rule (conftest): err(kernel) <= 2 * err(torch in the same dtype) + atol, both against fp64.
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA, assert_close_to_reference

import lego_kernels
from lego_kernels import _cuda
from lego_kernels._dispatch import cuda_extension
from lego_kernels.adaln import adaln_modulate_ref, gated_residual_adaln_ref
from lego_kernels.short_attention import short_attention_ref

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EPS = 1e-6

# atol per dtype, scaled by the reference's largest magnitude: about two units in the last place.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _nvcc() -> str | None:
    """Where setup.py looks for nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and Path(os.environ[var], "bin", "nvcc").is_file():
            return str(Path(os.environ[var], "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None


def _build_skipped() -> bool:
    return os.environ.get("LEGO_SKIP_CUDA_BUILD", "0") not in ("", "0") or _nvcc() is None


# ---------------------------------------------------------------------------------------------------------------------
# Build, import, clean refusal (no GPU needed)


def test_extension_is_built_where_nvcc_is():
    if _build_skipped():
        pytest.skip("the CUDA build was skipped: nvcc not found or LEGO_SKIP_CUDA_BUILD=1")
    assert cuda_extension() is not None, (
        f"nvcc is at {_nvcc()} but lego_kernels._C does not import: run `pip install -e .` "
        "(or `python setup.py build_ext --inplace`) and read the build output"
    )


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a GPU")
def test_extension_refuses_cleanly_without_gpu():
    if cuda_extension() is None:
        pytest.skip("lego_kernels._C is not built (nvcc absent or LEGO_SKIP_CUDA_BUILD=1)")
    # In a child process, so that a crash would be reported as a failure rather than take the test session down.
    code = """
import lego_kernels._C as C
assert C.device_count() == 0, C.device_count()
status = C.cuda_status()
assert status["device_count"] == 0 and status["error"], status
calls = {
    "adaln_modulate_fwd": lambda: C.adaln_modulate_fwd(16, 16, 16, 0, 16, 16, 16, 2, 3, 8, 1, 0, 0, 0),
    "adaln_modulate_bwd": lambda: C.adaln_modulate_bwd(16, 16, 16, 0, 16, 16, 16, 16, 16, 16, 2, 3, 8, 1, 1, 0, 0),
    "gated_residual_adaln_fwd": lambda: C.gated_residual_adaln_fwd(
        16, 16, 16, 16, 16, 0, 16, 16, 16, 16, 2, 3, 8, 1, 2, 0, 0),
    "gated_residual_adaln_bwd": lambda: C.gated_residual_adaln_bwd(
        16, 16, 16, 16, 16, 16, 0, 16, 16, 16, 16, 16, 16, 16, 16, 2, 3, 8, 1, 0, 0, 0),
    "short_attention_fwd": lambda: C.short_attention_fwd(16, 16, 16, 2, 4, 2, 72, 1, 0, 0),
    "short_attention_bwd": lambda: C.short_attention_bwd(16, 16, 16, 16, 16, 2, 4, 2, 64, 2, 0, 0),
}
for name, call in calls.items():
    try:
        call()
    except RuntimeError as e:
        assert "cannot use CUDA" in str(e), (name, str(e))
    else:
        raise AssertionError(name + " did not raise")
print("refused", len(calls))
"""
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert "refused 6" in run.stdout


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda C: C.short_attention_fwd(16, 16, 16, 2, 17, 2, 64, 0, 0, 0), "sequence length S=17"),
        (lambda C: C.short_attention_fwd(16, 16, 16, 2, 4, 2, 65, 0, 0, 0), "no kernel for head size 65"),
        (lambda C: C.short_attention_fwd(8, 16, 16, 2, 4, 2, 64, 0, 0, 0), "qkv is not 16-byte aligned"),
        (lambda C: C.short_attention_bwd(16, 16, 0, 16, 16, 2, 4, 2, 64, 0, 0, 0), "o is a null pointer"),
        (lambda C: C.adaln_modulate_fwd(16, 16, 16, 0, 16, 16, 16, 3, 1, 8, 2, 0, 0, 0), "pass image_index"),
        (lambda C: C.adaln_modulate_fwd(16, 16, 16, 0, 16, 16, 16, 2, 1, 8, 2, 7, 0, 0), "dtype code 7"),
        (lambda C: C.adaln_modulate_fwd(16, 16, 16, 0, 16, 16, 16, 2, 1, 9000, 2, 0, 0, 0), "exceeds"),
        (lambda C: C.gated_residual_adaln_fwd(16, 16, 16, 16, 16, 0, 16, 16, 16, 16, 2, 0, 8, 2, 0, 0, 0), "S >= 1"),
    ],
)
def test_extension_argument_errors(call, message):
    C = cuda_extension()
    if C is None:
        pytest.skip("lego_kernels._C is not built (nvcc absent or LEGO_SKIP_CUDA_BUILD=1)")
    with pytest.raises(ValueError, match=message):
        call(C)


def test_wrappers_want_cuda_tensors():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="take CUDA tensors"):
        _cuda.adaln_modulate_fwd(x, torch.randn(1, 8), torch.randn(1, 8), None)
    with pytest.raises(ValueError, match="take CUDA tensors"):
        _cuda.short_attention_fwd(torch.randn(2, 3, 3 * 64), 2)


# ---------------------------------------------------------------------------------------------------------------------
# The CPU emulator build of the kernels


def _emulator_toolchain():
    """(C++ compiler, CUDA include dir) or a reason why the emulator cannot be built here."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        return "no C++ compiler"
    candidates = [Path(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = _nvcc()
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for inc in candidates:
        if (inc / "cuda_fp16.h").is_file() and (inc / "driver_types.h").is_file():
            return cxx, inc
    return "no CUDA headers (cuda_fp16.h)"


def _load_emulator():
    toolchain = _emulator_toolchain()
    if isinstance(toolchain, str):
        pytest.skip(f"cannot build the CPU emulator of the kernels: {toolchain}")
    cxx, cuda_include = toolchain
    import pybind11

    sources = sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".cu", ".cpp"))
    digest = hashlib.sha1(f"{cxx}{sys.version}{pybind11.__version__}".encode())
    for p in sources:
        digest.update(p.read_bytes())
    out_dir = ROOT / "build" / f"emu-{digest.hexdigest()[:12]}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out_dir / f"_C_emu{suffix}"
    if not target.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        flags = [
            "-std=c++20", "-O0", "-fPIC", "-w", "-DLEGO_EMULATE", "-DLEGO_MODULE_NAME=_C_emu",
            f"-I{CSRC}", f"-I{cuda_include}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
        ]  # fmt: skip
        units = [("-x", "c++", CSRC / "adaln.cu"), ("-x", "c++", CSRC / "short_attention.cu"), (CSRC / "bindings.cpp",)]
        jobs = []
        for unit in units:
            obj = out_dir / (unit[-1].stem + ".o")
            jobs.append(subprocess.Popen([cxx, *flags, "-c", *map(str, unit), "-o", str(obj)], stderr=subprocess.PIPE))
        errors = [j.communicate()[1].decode() for j in jobs if j.wait() != 0]
        assert not errors, "the emulator build failed:\n" + "\n".join(errors)
        tmp = out_dir / f"_C_emu.{os.getpid()}.tmp"
        link = [cxx, "-shared", *(str(out_dir / (u[-1].stem + ".o")) for u in units), "-o", str(tmp)]
        subprocess.run(link, check=True)
        os.replace(tmp, target)  # atomic: a concurrent run sees the whole file or none
    spec = importlib.util.spec_from_file_location("_C_emu", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.EMULATED
    return module


@pytest.fixture(scope="module")
def emulator_module():
    return _load_emulator()


@pytest.fixture
def emulator(emulator_module, monkeypatch):
    """Routes lego_kernels._cuda's CPU-tensor calls to the emulator build for the duration of one test."""
    monkeypatch.setattr(_cuda, "_cpu_emulator", emulator_module)
    return emulator_module


# ---------------------------------------------------------------------------------------------------------------------
# Cases, shared by the emulator and the GPU


def _check(out, out_torch, out_fp64, name):
    atol = TOL[out.dtype] * max(1.0, out_fp64.abs().max().item()) if out.dtype in TOL else 1e-5
    assert_close_to_reference(out, out_torch, out_fp64, atol, name)


def _image_index(mode, n, b, device):
    if mode is None:
        return None
    if mode == "sorted":
        return torch.randint(0, b, (n,), device=device).sort().values
    if mode == "shuffled":  # images interleaved: many flushes of the per-image sums
        return torch.randint(0, b, (n,), device=device)
    if mode == "sparse":  # only the first and last image have sequences: the others' gradients must be exactly 0
        return torch.randint(0, 2, (n,), device=device) * (b - 1)
    if mode == "int32":
        return torch.randint(0, b, (n,), device=device, dtype=torch.int32)
    raise ValueError(mode)


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _grads(outputs, inputs, upstream):
    return torch.autograd.grad(outputs, inputs, upstream)


def _stats_reference(v64, v):
    """mean and rstd of each row: of v64 in fp64, and of v (in the test dtype) in fp32, the 'torch' term for the fp32
    statistics."""
    out = []
    for w in (v64.double(), v.float()):
        w = w.detach().flatten(0, 1)
        out.append((w.mean(-1), (w.var(-1, unbiased=False) + EPS).rsqrt()))
    return out


def adaln_modulate_case(device, dtype, n, s, d, b, mode, offset=False):
    x = torch.randn(n, s, d, device=device, dtype=dtype) * 2 + 0.5  # |mean| ~ std: a one-pass variance would show
    shift = torch.randn(b, d, device=device, dtype=dtype)
    scale = torch.randn(b, d, device=device, dtype=dtype)
    if offset:  # views one element into their allocation: the 16-byte vector path must step aside
        x = torch.randn(x.numel() + 1, device=device, dtype=dtype)[1:].view(n, s, d)
    index = _image_index(mode, n, b, device)
    dy = torch.randn(n, s, d, device=device, dtype=dtype)

    y, mean, rstd = _cuda.adaln_modulate_fwd(x, shift, scale, index)
    dx, dshift, dscale = _cuda.adaln_modulate_bwd(dy, x, shift, scale, index, mean, rstd)

    ref64, ref = _leaves((x, shift, scale), torch.float64), _leaves((x, shift, scale))
    y64, yt = adaln_modulate_ref(*ref64, index), adaln_modulate_ref(*ref, index)
    g64, gt = _grads(y64, ref64, dy.double()), _grads(yt, ref, dy)
    _check(y, yt, y64, "y")
    (m64, r64), (m32, r32) = _stats_reference(x, x)
    _check(mean, m32, m64, "mean")
    _check(rstd, r32, r64, "rstd")
    for out, t, r, name in zip((dx, dshift, dscale), gt, g64, ("dx", "dshift", "dscale")):
        _check(out, t, r, name)


def gated_residual_adaln_case(device, dtype, n, s, d, b, mode, zero_dx_out=False):
    x, y = (torch.randn(n, s, d, device=device, dtype=dtype) for _ in range(2))
    gate, shift, scale = (torch.randn(b, d, device=device, dtype=dtype) for _ in range(3))
    index = _image_index(mode, n, b, device)
    dx_out = torch.zeros_like(x) if zero_dx_out else torch.randn_like(x)
    dh = torch.randn_like(x)

    x_out, h, mean, rstd = _cuda.gated_residual_adaln_fwd(x, y, gate, shift, scale, index)
    grads = _cuda.gated_residual_adaln_bwd(dx_out, dh, x_out, y, gate, scale, index, mean, rstd)

    inputs = (x, y, gate, shift, scale)
    ref64, ref = _leaves(inputs, torch.float64), _leaves(inputs)
    out64, out_t = gated_residual_adaln_ref(*ref64, index), gated_residual_adaln_ref(*ref, index)
    g64 = _grads(out64, ref64, (dx_out.double(), dh.double()))
    gt = _grads(out_t, ref, (dx_out, dh))
    _check(x_out, out_t[0], out64[0], "x_out")
    _check(h, out_t[1], out64[1], "h")
    (m64, r64), (m32, r32) = _stats_reference(out64[0], out_t[0])
    _check(mean, m32, m64, "mean")
    _check(rstd, r32, r64, "rstd")
    for out, t, r, name in zip(grads, gt, g64, ("dx", "dy", "dgate", "dshift", "dscale")):
        _check(out, t, r, name)


def short_attention_case(device, dtype, n, s, heads, head_dim, offset=False):
    numel = n * s * 3 * heads * head_dim
    qkv = torch.randn(numel + offset, device=device, dtype=dtype)[int(offset) :].view(n, s, 3 * heads * head_dim)
    qkv = qkv * 1.5  # peakier softmax than unit scores
    do = torch.randn(n, s, heads * head_dim, device=device, dtype=dtype)

    o, lse = _cuda.short_attention_fwd(qkv, heads)
    dqkv = _cuda.short_attention_bwd(do, qkv, o, lse, heads)

    (q64,), (qt,) = _leaves([qkv], torch.float64), _leaves([qkv])
    o64, ot = short_attention_ref(q64, heads), short_attention_ref(qt, heads)
    _check(o, ot, o64, "o")
    lses = []
    for dt in (torch.float64, torch.float32):
        q, k, _ = qkv.to(dt).view(n, s, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        lses.append(torch.logsumexp(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1))  # (N, H, S)
    _check(lse, lses[1], lses[0], "lse")
    _check(dqkv, _grads(ot, qt, do)[0], _grads(o64, q64, do.double())[0], "dqkv")


def custom_op_case(device, dtype, public):
    """Forward and every gradient through the custom ops with backend="cuda" (the public functions on a GPU; the
    torch.ops entry points on the CPU, where the public functions refuse "cuda" for CPU tensors)."""
    n, s, d, b, heads = 6, 4, 144, 3, 2
    x, y = (torch.randn(n, s, d, device=device, dtype=dtype) for _ in range(2))
    gate, shift, scale = (torch.randn(b, d, device=device, dtype=dtype) for _ in range(3))
    qkv = torch.randn(n, s, 3 * d, device=device, dtype=dtype)
    index = _image_index("shuffled", n, b, device)

    def modulate(x, shift, scale):
        if public:
            return lego_kernels.adaln_modulate(x, shift, scale, index, backend="cuda")
        return torch.ops.lego.adaln_modulate_fwd(x, shift, scale, index, "cuda")[0]

    def gated(x, y, gate, shift, scale):
        if public:
            return lego_kernels.gated_residual_adaln(x, y, gate, shift, scale, index, backend="cuda")
        return torch.ops.lego.gated_residual_adaln_fwd(x, y, gate, shift, scale, index, "cuda")[:2]

    def attention(qkv):
        if public:
            return lego_kernels.short_attention(qkv, heads, backend="cuda")
        return torch.ops.lego.short_attention_fwd(qkv, heads, "cuda")[0]

    cases = [
        (modulate, adaln_modulate_ref, (x, shift, scale)),
        (gated, gated_residual_adaln_ref, (x, y, gate, shift, scale)),
        (attention, None, (qkv,)),
    ]
    for fn, ref_fn, inputs in cases:
        ref_fn = ref_fn or (lambda qkv: short_attention_ref(qkv, heads))
        ref_args = () if fn is attention else (index,)
        leaves, ref64, ref = _leaves(inputs), _leaves(inputs, torch.float64), _leaves(inputs)
        out, out64, out_t = fn(*leaves), ref_fn(*ref64, *ref_args), ref_fn(*ref, *ref_args)
        out, out64, out_t = (o if isinstance(o, tuple | list) else (o,) for o in (out, out64, out_t))
        upstream = [torch.randn_like(o) for o in out]
        for i, (o, o64, ot) in enumerate(zip(out, out64, out_t)):
            _check(o.detach(), ot.detach(), o64.detach(), f"{fn.__name__} output {i}")
        g = _grads(out, leaves, upstream)
        g64 = _grads(out64, ref64, [u.double() for u in upstream])
        gt = _grads(out_t, ref, upstream)
        for i, (a, t, r) in enumerate(zip(g, gt, g64)):
            _check(a, t, r, f"{fn.__name__} gradient {i}")


ADALN_SHAPES = [  # (N, S, d, B, image_index mode)
    (6, 5, 37, 3, None),  # odd d: one element per access
    (10, 4, 96, 2, "sorted"),  # 16-byte packs
    (9, 3, 64, 4, "shuffled"),
    (8, 2, 200, 4, "sparse"),
    (5, 1, 48, 5, "int32"),
    (4, 2, 1152, 2, None),  # XL's width: 2 packs per thread in fp32
    (3, 2, 2056, 3, "shuffled"),  # 2 packs of 8 per thread in fp16/bf16
    (2, 3, 4100, 1, None),  # wide rows: 8 single elements per thread (fp16/bf16), 544 threads; 4 packs in fp32
]
ATTENTION_SHAPES = [  # (N, S, H, head size)
    (5, 4, 3, 32),
    (3, 7, 2, 72),
    (2, 16, 2, 64),
    (7, 1, 3, 48),
    (3, 13, 1, 128),
    (4, 5, 2, 80),
    (3, 3, 1, 96),
]


# ---------------------------------------------------------------------------------------------------------------------
# On the CPU emulator (no GPU needed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=str)
def test_emulated_adaln(emulator, shape, dtype):
    n, s, d, b, mode = shape
    adaln_modulate_case("cpu", dtype, n, s, d, b, mode, offset=mode == "sorted")
    gated_residual_adaln_case("cpu", dtype, n, s, d, b, mode, zero_dx_out=mode == "sparse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_emulated_short_attention(emulator, shape, dtype):
    short_attention_case("cpu", dtype, *shape, offset=shape[1] == 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emulated_custom_ops(emulator, dtype):
    custom_op_case("cpu", dtype, public=False)


def test_emulated_brick_with_backend_cuda(emulator, monkeypatch):
    """A brick built with backend="cuda" (issue #20: LegoModel.from_name(..., backend="cuda") stopped at its first
    forward): its ops with a CUDA kernel run it, patch_embed and patch_unembed (none) take auto's choice. On the CPU the
    dispatch is told the CPU can run "cuda" (the emulator does), so auto's choice for those two is the reference."""
    from lego import LegoBrick
    from lego_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "available_backends", lambda device: ["cuda", "triton", "torch"])
    torch.manual_seed(0)
    ref = LegoBrick(4, 2, 64, 1, 2, in_channels=3, backend="torch")  # head size 32: compiled in csrc
    with torch.no_grad():
        for param in ref.parameters():
            param.normal_(0, 0.2)  # no zero-initialized paths
    fused = LegoBrick(4, 2, 64, 1, 2, in_channels=3, backend="cuda")
    fused.load_state_dict(ref.state_dict())
    x, prev, cond = torch.randn(2, 3, 8, 12), torch.randn(2, 3, 8, 12), torch.randn(2, 64)
    outs = []
    for brick in (ref, fused):
        out = brick(x, prev, cond)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        err = (b.grad - a.grad).abs().max().item()
        assert err <= 1e-4 + 1e-3 * a.grad.abs().max().item(), (
            f"gradient of {name}: {err:.3g} off, largest {a.grad.abs().max():.3g}"
        )


def test_emulated_empty_and_errors(emulator):
    o, lse = _cuda.short_attention_fwd(torch.randn(0, 4, 3 * 64), 1)
    assert o.shape == (0, 4, 64) and lse.shape == (0, 1, 4)
    _, dshift, dscale = _cuda.adaln_modulate_bwd(*(torch.randn(0, 2, 8),) * 2, *(torch.randn(2, 8),) * 2, None,
                                                 torch.empty(0), torch.empty(0))  # fmt: skip
    assert dshift.abs().sum() == 0 and dscale.shape == (2, 8)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="must be contiguous"):
        _cuda.adaln_modulate_fwd(
            x.transpose(0, 1).contiguous().transpose(0, 1), torch.randn(1, 8), torch.randn(1, 8), None
        )
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        _cuda.adaln_modulate_fwd(x.double(), torch.randn(1, 8).double(), torch.randn(1, 8).double(), None)
    with pytest.raises(TypeError, match="shift is torch.float16"):
        _cuda.adaln_modulate_fwd(x, torch.randn(1, 8).half(), torch.randn(1, 8), None)
    with pytest.raises(ValueError, match="head size 24"):
        _cuda.short_attention_fwd(torch.randn(2, 3, 3 * 48), 2)


# ---------------------------------------------------------------------------------------------------------------------
# On the GPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        *ADALN_SHAPES,
        (256, 4, 1152, 64, None),
        (512, 4, 384, 8, "shuffled"),
        (64, 16, 1024, 4, "sorted"),
        (3, 2, 8192, 1, None),
        (7, 3, 8191, 2, "int32"),
    ],
    ids=str,
)
def test_cuda_adaln(shape, dtype):
    n, s, d, b, mode = shape
    adaln_modulate_case("cuda", dtype, n, s, d, b, mode, offset=mode == "sorted")
    gated_residual_adaln_case("cuda", dtype, n, s, d, b, mode, zero_dx_out=mode == "sparse")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [*ATTENTION_SHAPES, (1024, 4, 16, 72), (2048, 4, 6, 64), (4096, 1, 16, 72), (300, 16, 16, 64), (999, 9, 3, 128)],
    ids=str,
)
def test_cuda_short_attention(shape, dtype):
    short_attention_case("cuda", dtype, *shape, offset=shape[1] == 7)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_through_public_ops(dtype):
    custom_op_case("cuda", dtype, public=True)


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    qkv = torch.randn(64, 4, 3 * 128, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # qkv is made on the current stream: read it only once it is done
    with torch.cuda.stream(stream):
        o, _ = _cuda.short_attention_fwd(qkv, 2)
    stream.synchronize()
    torch.testing.assert_close(o, short_attention_ref(qkv, 2), atol=1e-5, rtol=1e-5)
