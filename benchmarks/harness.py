"""The shared benchmark harness: run settings (full or smoke), device facts, measured ceilings and timing.

Every measurement goes through ``measure``: warm-up calls (compiles, autotuning, the caching allocator), then rounds
timed by pytest-benchmark's ``benchmark.pedantic``. On a GPU each round is also bracketed by CUDA events, and the
per-call times that the report uses come from those events (the GPU's own clock, no host synchronisation inside a
round); pytest-benchmark's own wall-clock statistics stay in its JSON beside them, taken with ``sync_timer`` so that
they include the GPU work too. On the CPU (smoke mode) rounds are timed with ``time.perf_counter``.

The ceilings every figure is compared with are measured on the same device in the same run (``measure_peaks``): HBM
bandwidth from a large device-to-device copy (bytes read + bytes written) and bf16 matmul throughput from a large
square matmul on random data. Set LEGO_BENCH_SMOKE=1 for tiny shapes on the CPU (a check of the harness, not results).
"""

from __future__ import annotations

import gc
import importlib.metadata
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SMOKE = os.environ.get("LEGO_BENCH_SMOKE", "0") not in ("", "0")
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    warmup: int  # untimed calls first: compiles, autotuning, allocator growth
    target_s: float  # about this long timed per measurement
    min_rounds: int
    max_rounds: int
    min_round_s: float  # a round repeats the call until it lasts at least this (amortizes the round's own overhead)


# Chosen so that the full suite ends within ~8 minutes on an H100, torch.compile warm-ups included.
if SMOKE:
    OPS = BRICK = TRAIN = Settings(warmup=1, target_s=0.0, min_rounds=2, max_rounds=2, min_round_s=0.0)
    SAMPLE = Settings(warmup=0, target_s=0.0, min_rounds=2, max_rounds=2, min_round_s=0.0)
else:
    OPS = Settings(warmup=5, target_s=0.25, min_rounds=10, max_rounds=200, min_round_s=1e-3)
    BRICK = Settings(warmup=3, target_s=0.5, min_rounds=5, max_rounds=50, min_round_s=5e-3)
    TRAIN = Settings(warmup=2, target_s=1.5, min_rounds=5, max_rounds=20, min_round_s=0.0)
    SAMPLE = Settings(warmup=0, target_s=1.5, min_rounds=3, max_rounds=5, min_round_s=0.0)  # warmed by the logged run

# bf16 autocast for bricks, training and sampling on a GPU, as in DiT-style training. Not on the CPU: the smoke run
# checks plumbing, and oneDNN's bf16 kernels cost seconds of set-up per new shape there.
AMP_DTYPE = torch.bfloat16


def amp_dtype(dev: torch.device) -> torch.dtype | None:
    return AMP_DTYPE if dev.type == "cuda" else None


def autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=AMP_DTYPE, enabled=amp_dtype(dev) is not None)


def device() -> torch.device:
    """The device benchmarks run on: LEGO_BENCH_DEVICE, else the GPU when there is one, else the CPU."""
    name = os.environ.get("LEGO_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def sync_timer() -> float:
    """pytest-benchmark's timer: waits for queued GPU work first, so a round's wall time includes it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def compile_backend() -> str:
    """Inductor on a GPU; aot_eager for smoke runs (traces Dynamo + AOTAutograd the same way, generates no code)."""
    default = "aot_eager" if SMOKE or not torch.cuda.is_available() else "inductor"
    return os.environ.get("LEGO_BENCH_COMPILE_BACKEND", default)


def compiled(fn, fullgraph: bool = True):
    return torch.compile(fn, backend=compile_backend(), dynamic=False, fullgraph=fullgraph)


def cleanup() -> None:
    """Give freed GPU memory back between benchmarks. A full gc pass costs ~0.5 s with torch and diffusers loaded,
    so it runs only when more than 1 GB is still allocated (a model kept alive by a reference cycle)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if torch.cuda.memory_allocated() > 1 << 30:
            gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), for a handful of values."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(ms: list[float]) -> dict:
    return {
        "median_ms": quantile(ms, 0.5),
        "p20_ms": quantile(ms, 0.2),
        "p80_ms": quantile(ms, 0.8),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "mean_ms": sum(ms) / len(ms),
    }


def measure(benchmark, fn, settings: Settings, dev: torch.device) -> dict:
    """Time ``fn()`` (one call = one unit: a kernel, a training step, a whole sampler run); returns per-call stats in
    ms.

    ``benchmark`` is pytest-benchmark's fixture (or None outside pytest). The round count is sized from one timed
    call after the warm-up so that the measurement lasts about ``settings.target_s``.
    """
    for _ in range(settings.warmup):
        fn()
    synchronize(dev)
    t0 = time.perf_counter()
    fn()
    synchronize(dev)
    estimate = max(time.perf_counter() - t0, 1e-7)
    iterations = max(1, math.ceil(settings.min_round_s / estimate))
    rounds = math.ceil(settings.target_s / (estimate * iterations)) if settings.target_s > 0 else 0
    rounds = int(min(settings.max_rounds, max(settings.min_rounds, rounds)))

    marks: list = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

        def one_round():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                fn()
            end.record()
            marks.append((start, end))
    else:

        def one_round():
            t = time.perf_counter()
            for _ in range(iterations):
                fn()
            marks.append(time.perf_counter() - t)

    if benchmark is None:
        for _ in range(rounds):
            one_round()
    else:
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    synchronize(dev)
    if dev.type == "cuda":
        per_call = [start.elapsed_time(end) / iterations for start, end in marks]
        clock = "cuda-events"
    else:
        per_call = [t * 1e3 / iterations for t in marks]
        clock = "perf_counter"
    timing = summarize(per_call)
    timing.update(rounds=len(per_call), iterations=iterations, clock=clock)
    if dev.type == "cuda":
        timing["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
    return timing


def measure_or_skip_oom(benchmark, fn, settings: Settings, dev: torch.device, what: str) -> dict:
    """``measure``, but running out of device memory skips the test with that reason (a limit, not a bug)."""
    try:
        return measure(benchmark, fn, settings, dev)
    except torch.OutOfMemoryError as e:
        message = str(e).splitlines()[0]
    cleanup()
    import pytest

    pytest.skip(f"out of memory: {what}: {message}")


def record(benchmark, **fields) -> dict:
    """Attach a result record to the benchmark (it lands in pytest-benchmark's JSON as ``extra_info``)."""
    fields = {k: _jsonable(v) for k, v in fields.items()}
    if benchmark is not None:
        benchmark.extra_info.update(fields)
    return fields


def _jsonable(v):
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, torch.device):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "__dataclass_fields__"):
        return _jsonable(asdict(v))
    return v


# ---------------------------------------------------------------------------------------------------------------------
# Ceilings, measured on the device of the run


def measure_peaks(dev: torch.device) -> dict:
    """Peak HBM bandwidth (device-to-device copy, read + write bytes) and bf16 matmul throughput, medians of ~20
    runs."""
    if dev.type == "cuda":
        copy_bytes, n, reps = 1 << 30, 8192, 20
    else:  # smoke: only checks the plumbing
        copy_bytes, n, reps = 1 << 24, 256, 3
    copy_ms = _copy_ms(copy_bytes, dev, reps)
    mm_ms = _matmul_ms(n, dev, reps)
    cleanup()
    return {
        "hbm_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "bf16_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "copy_bytes": copy_bytes,
        "matmul_n": n,
        "method": f"median of {reps} runs: copy_ of {copy_bytes >> 20} MiB (bytes read + written); "
        f"bf16 mm {n}^3 on random data",
    }


def _copy_ms(copy_bytes, dev, reps):
    src = torch.randn(copy_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    return _median_ms(lambda: dst.copy_(src), dev, reps)


def _matmul_ms(n, dev, reps):
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    return _median_ms(lambda: torch.mm(a, b), dev, reps)


def _median_ms(fn, dev, reps):
    for _ in range(3):
        fn()
    synchronize(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return quantile(times, 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Device and software facts


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn,
        "triton": package_version("triton"),
        "diffusers": package_version("diffusers"),
        "flash_attn": package_version("flash-attn", "flash_attn"),
        "pytest_benchmark": package_version("pytest-benchmark"),
        "numpy": package_version("numpy"),
    }


def driver_version() -> str | None:
    """The NVIDIA driver's version: from NVML, else nvidia-smi, else the CUDA driver API number."""

    def nvml():
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v

    def smi():
        cmd = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()[0]

    def cuda_api():
        return f"CUDA driver API {torch._C._cuda_getDriverVersion()}"

    for source in (nvml, smi, cuda_api):
        try:
            version = source().strip()
        except Exception:  # noqa: BLE001, S112 - each source may be missing; the next one is tried
            continue
        return version
    return None


def git_info() -> dict:
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=False
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip() or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip()) if commit else None
    except Exception:  # noqa: BLE001 - no git, or not a checkout
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def device_info(dev: torch.device) -> dict:
    import lego_kernels as lk
    from lego_kernels._dispatch import cuda_extension

    info = {
        "device_type": dev.type,
        "name": platform.processor() or platform.machine() or "cpu",
        "capability": None,
        "driver": None,
        "multiprocessors": None,
        "memory_gb": None,
        "l2_cache_mb": None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions(),
        "lego_kernels": {
            "available_backends": lk.available_backends(dev),
            "cuda_extension_built": cuda_extension() is not None,
            "auto_prefers_cuda": dict(lk.AUTO_PREFERS_CUDA),
            "backend_env": os.environ.get("LEGO_KERNELS_BACKEND"),
        },
        "git": git_info(),
        "smoke": SMOKE,
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            driver=driver_version(),
            multiprocessors=props.multi_processor_count,
            memory_gb=props.total_memory / 1e9,
            l2_cache_mb=getattr(props, "L2_cache_size", 0) / 2**20 or None,
        )
    return info
