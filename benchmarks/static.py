"""Static kernel profile: every Triton launch of a real training and sampling step, compiled and read, with no GPU.

Usage: python -m benchmarks.static [--arch 90 80] [--dtype bf16 fp32] [--batch 64 256] [--model LEGO-XL-PG-32 ...]
       [--out DIR] [--no-cuda]

One profile per Triton version: it profiles the Triton that Python imports (run it once more with another Triton first
on PYTHONPATH, e.g. ``pip install --target DIR triton==3.6.0``, for that version) and writes
``static-profile-triton<major.minor>.json`` / ``.md``. Every row names its Triton version, dtype and target.

What it does, step by step:

1. Capture. The models run on the ``meta`` device in each dtype, bf16 (what bf16 autocast hands the fused ops) and
   fp32 (the default training precision), with every fused op forced to its Triton backend. Each ``lego::`` custom op
   runs its real implementation (the Triton launchers) in place of its fake one, and ``JITFunction.run`` records the
   launch (kernel, grid, arguments, constexprs, options) instead of launching. A training step is LegoLoss (all
   patches) forward + backward; a sampling step is one denoiser call under no_grad (one Heun half-step;
   classifier-free guidance would double the batch).
2. Specialize. The arguments are bound by Triton's own binder (``create_function_from_signature`` with a CUDA backend),
   as at a real launch: a tensor stands in as a pointer whose address is its storage offset from a 512-byte aligned
   base (PyTorch's caching allocator), so 16-byte aligned pointers and ints divisible by 16 get Triton's divisibility
   attributes. Identical specializations compile once.
3. Compile with ``triton.compile`` for sm_90 (and sm_80), then read the cubin with the ``cuobjdump`` Triton bundles:
   registers, local memory (spills), shared memory, and the SASS.
4. Derive, per launch: resident CTAs per SM (registers in units of 256 per warp, 2048 threads, 32 CTAs, shared memory
   with 1 KB reserved per CTA), waves = programs / (SMs x resident CTAs), global load / store widths, and the
   dependent global-load round trips before the first global store (``load_rounds``, method in its docstring).
   The programs the waves check asks of a launch (``programs_needed``): two waves where each of their programs would
   still move >= 8 KB; for a kernel whose outputs are sums over independent groups of rows (``REDUCTIONS``: the adaLN
   backward sums each image's rows), at most the programs its partial sums allow: one program per group writes final
   sums, C per group cost groups x C partials written and read back, allowed while they add at most
   (MAX_BYTES_RATIO - 1) x the op's minimum bytes (``programs_allowed_by_bytes``).
5. Bytes, per op call: a launch moves each tensor it really uses once (a parameter the compiled PTX never loads, a
   placeholder for an absent input, is not counted; re-reads that L2 absorbs are not counted either), plus the bytes
   the op's own PyTorch steps move (sorts, sums of partial buffers). The op's minimum is its inputs read once and its
   outputs written once. A ratio above 1 is traffic the op's math does not need (a gradient read by two kernels,
   fp32 partial buffers written and read back).
   Atomics: a kernel that sums into fp32 accumulators with global atomics (RED / ATOM in its SASS) declares its L2
   atomic traffic as an ``atomic_bytes(grid, args) -> {accumulator argument: bytes}`` attribute of its JITFunction
   (programs x the accumulator bytes each one adds); a launch whose SASS has atomics and that declares nothing is an
   error. That traffic goes to L2 and is reported in its own field (``atomic_bytes``, per launch and per op), not in
   the bytes. The accumulators' DRAM bytes are in the op's bytes: their zeroing and their final read (the op's PyTorch
   steps: zeros, then the cast or sum that reads them).
6. CUDA kernels (csrc/): registers, spills and static shared memory from ``nvcc -O3 -arch=sm_90a -Xptxas -v``.

It leans on a few private hooks, checked with torch 2.13 and Triton 3.9: ``CustomOpDef._abstract_fn`` / ``_init_fn``,
``JITFunction.run``'s signature, ``triton.runtime.jit.create_function_from_signature``; a version that moves them
breaks the capture visibly: an error, or a profile without launches, which tests/test_static_profile.py rejects.

Writes ``static-profile-triton<major.minor>.json`` and ``.md`` under ``--out`` (default ``benchmarks/results``).
Nothing here is a timing: waves, occupancy and round trips are read from compiled code; GPU times are not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from unittest import mock

# name -> (channels, canvas): the latent XL models, and the pixel models at the shapes issue 20's review read.
MODELS = {
    "LEGO-XL-PG-32": (4, 32),
    "LEGO-XL-U-32": (4, 32),
    "LEGO-S-PG-64": (3, 64),
    "LEGO-L-PG-64": (3, 64),
    "LEGO-XL-PG-64": (3, 64),
    "LEGO-XL-U-64": (3, 64),
}
BATCHES = (64, 256)
STEPS = ("train", "sample")
ARCHS = (90, 80)
DTYPES = ("bf16", "fp32")  # the fused ops' dtype: bf16 autocast, or fp32 (the default training precision)
NUM_CLASSES = 1000

# Per-SM limits (CUDA occupancy tables) and the SM counts waves are counted over: H100/H200 SXM 132, A100 108.
SM_LIMITS = {
    90: {"sms": 132, "regs": 65536, "threads": 2048, "ctas": 32, "smem": 228 * 1024},
    80: {"sms": 108, "regs": 65536, "threads": 2048, "ctas": 32, "smem": 164 * 1024},
}
SMEM_RESERVED_PER_CTA = 1024  # sm_80 and later reserve 1 KB of shared memory per CTA (sm_90 cubins list it as static)
WORK_PER_PROGRAM = 8192  # bytes below which a program is too small to be worth splitting further (the waves check)

_KERNEL_MODULES = (
    "lego_kernels.adaln",
    "lego_kernels.short_attention",
    "lego_kernels.patch_embed",
    "lego_kernels.patch_unembed",
)
_RESULTS = Path(__file__).resolve().parent / "results"
_REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------------------
# SASS reading. Pure text functions: the tests prove them on hand-made kernels.

_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.+?)\s*;")
_FUNCTION = re.compile(r"Function\s*:\s*(\S+)")
_REG = re.compile(r"\bR(\d+)(\.64)?\b")
_GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")
_GLOBAL_STORES = ("STG", "RED", "REDG", "ATOM", "ATOMG", "UTMASTG", "UBLKRED")
_NO_DEST = ("ST", "STS", "STG", "STL", "STSM", "RED", "REDG", "BAR", "BRA", "EXIT", "DEPBAR", "RET", "NOP", "UTMASTG")


def parse_sass(text: str) -> dict[str, list[str]]:
    """cuobjdump -sass output -> {function name: [instruction text, ...]} in address order."""
    functions, current = {}, None
    for line in text.splitlines():
        m = _FUNCTION.search(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _SASS_LINE.search(line)
        if m and current is not None:
            current.append(m.group(1))
    return functions


def _split(instr: str) -> tuple[str, list[str]]:
    """'@P0 LDG.E.128 R4, desc[UR8][R16.64]' -> ('LDG.E.128', ['R4', 'desc[UR8][R16.64]'])."""
    parts = instr.split(None, 1)
    if parts and parts[0].startswith("@"):
        parts = parts[1].split(None, 1) if len(parts) > 1 else []
    if not parts:
        return "", []
    opcode = parts[0]
    operands = [o.strip() for o in parts[1].split(",")] if len(parts) > 1 else []
    return opcode, operands


def _base(opcode: str) -> str:
    return opcode.split(".", 1)[0]


def access_width(opcode: str) -> int:
    """Bits per thread of a load/store opcode: LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32."""
    mods = opcode.split(".")[1:]
    for mod, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if mod in mods:
            return bits
    return 32


def _regs(operand: str) -> set[int]:
    out = set()
    for m in _REG.finditer(operand):
        r = int(m.group(1))
        out.update((r, r + 1) if m.group(2) else (r,))
    return out


def _reads_writes(opcode: str, operands: list[str]) -> tuple[set[int], set[int]]:
    """(registers read, registers written) of one instruction; the first operand is the destination unless the
    instruction writes no register (stores, barriers, branches)."""
    if not operands:
        return set(), set()
    if _base(opcode) in _NO_DEST:
        return set().union(*map(_regs, operands)), set()
    dest = _regs(operands[0])
    if _base(opcode) in ("LDG", "LDS", "LDL", "LD", "LDC", "LDSM"):
        first = min(dest) if dest else 0
        dest = set(range(first, first + max(1, access_width(opcode) // 32)))
    return set().union(set(), *map(_regs, operands[1:])), dest


def load_rounds(instructions: list[str]) -> dict:
    """Dependent global-load round trips in a kernel's SASS, read in address order.

    Method: global loads issued back to back form one group; a group ends at the first instruction that has to wait
    for one of its loads: one that reads or overwrites a register a pending LDG writes, or a DEPBAR while an
    asynchronous copy (LDGSTS) is pending. A later global load starts a new group, i.e. another round trip to memory
    that this thread cannot overlap with the previous one. Straight-line code (unrolled loops) is counted exactly;
    a runtime loop's body is counted once (a lower bound). Returns the groups before the first global store and in
    the whole kernel, the barriers (BAR.SYNC) before the first store, and spill instructions (STL / LDL).
    """
    rounds = rounds_before_store = barriers_before_store = 0
    pending: set[int] = set()
    async_pending = group_open = stored = False
    spill_ops = 0
    for instr in instructions:
        opcode, operands = _split(instr)
        base = _base(opcode)
        if base in ("STL", "LDL"):
            spill_ops += 1
        if base in _GLOBAL_STORES and not stored:
            stored, rounds_before_store = True, rounds
        reads, writes = _reads_writes(opcode, operands)
        waits = bool((reads | writes) & pending) or (base == "DEPBAR" and async_pending)
        if waits:
            pending.clear()
            async_pending = group_open = False
        if base in _GLOBAL_LOADS:
            if not group_open:
                rounds += 1
                group_open = True
            if base == "LDG":
                pending |= writes
            else:
                async_pending = True
        if base == "BAR" and not stored:
            barriers_before_store += 1
    if not stored:
        rounds_before_store = rounds
    return {
        "rounds_before_store": rounds_before_store,
        "rounds_total": rounds,
        "barriers_before_store": barriers_before_store,
        "spill_instructions": spill_ops,
    }


def access_widths(instructions: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Counts of global loads and stores by width in bits, e.g. ({'128': 3, '32': 8}, {'128': 1})."""
    loads, stores = Counter(), Counter()
    for instr in instructions:
        opcode, _ = _split(instr)
        base = _base(opcode)
        if base == "LDG":
            loads[str(access_width(opcode))] += 1
        elif base == "STG":
            stores[str(access_width(opcode))] += 1
    return dict(sorted(loads.items())), dict(sorted(stores.items()))


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage -> {function: {'REG': .., 'STACK': .., 'SHARED': .., 'LOCAL': ..}}."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function\s+(\S+?):\s*$", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            current = None
    return out


def resident_ctas(cc: int, regs: int, threads: int, smem: int) -> tuple[int, str]:
    """(CTAs of one kernel resident per SM, the limiting resource)."""
    lim = SM_LIMITS[cc]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    # sm_90 cubins already count the 1 KB reserve in their static shared memory (when they use any); sm_80's do not.
    per_cta = smem if cc >= 90 and smem >= SMEM_RESERVED_PER_CTA else smem + SMEM_RESERVED_PER_CTA
    limits = {
        "registers": (lim["regs"] // regs_per_warp) // warps,
        "threads": lim["threads"] // threads,
        "shared memory": lim["smem"] // per_cta,
        "CTA slots": lim["ctas"],
    }
    which = min(limits, key=limits.get)
    return limits[which], which


# ----------------------------------------------------------------------------------------------------------------------
# The waves rule. Pure functions of a launch's numbers: the tests prove them on hand-made ones.


def _adaln_bwd_reduction(args: dict) -> tuple[int, int]:
    """lego_kernels.adaln's backward: dshift/dscale/dgate are sums over the rows of each image (groups = images, the
    rows of SCALE, a [B, d] vector); a program's partial is K = 2 HAS_NORM + HAS_RESIDUAL fp32 rows of width d."""
    kinds = 2 * bool(args["HAS_NORM"]) + bool(args["HAS_RESIDUAL"])
    return args["SCALE"].shape[0], kinds * args["d"] * 4


# Kernels whose outputs are sums over independent groups of their rows, kernel name -> (bound launch arguments ->
# (groups, bytes of one program's partial sums)). One program per group writes its group's sums directly; splitting a
# group over several programs makes each write a partial that a second pass reads back.
REDUCTIONS = {"_adaln_bwd_kernel": _adaln_bwd_reduction}


def programs_allowed_by_bytes(groups: int, partial_bytes: int, op_min_bytes: int) -> int:
    """The most programs a reduction over ``groups`` groups may run within the bytes bound: C programs per group cost
    groups * C partials, each written and read back (2 * partial_bytes), and C >= 2 is allowed while that traffic stays
    within (MAX_BYTES_RATIO - 1) x the op's minimum bytes; one program per group needs no partials. Counted in whole
    programs per group: an uneven split leaves the longest program (what a grid under one wave waits for) as long."""
    budget = int(round(MAX_BYTES_RATIO - 1, 9) * op_min_bytes)
    return groups * max(1, budget // (groups * 2 * partial_bytes))


def programs_needed(
    launch_bytes: int, per_wave: int, reduction: tuple[int, int] | None = None, op_min_bytes: int = 0
) -> int:
    """Programs a launch must run to pass the waves check: two waves where every program of two waves would still move
    >= WORK_PER_PROGRAM bytes, but for a reduction (groups, partial bytes) no more than programs_allowed_by_bytes;
    0 where the work is too small for two waves."""
    if launch_bytes < 2 * per_wave * WORK_PER_PROGRAM:
        return 0
    if reduction is None:
        return 2 * per_wave
    return min(2 * per_wave, programs_allowed_by_bytes(*reduction, op_min_bytes))


# ----------------------------------------------------------------------------------------------------------------------
# Capture: run the models on meta tensors and record every Triton launch instead of running it.


@dataclasses.dataclass
class Launch:
    fn: object  # triton JITFunction
    grid: tuple[int, int, int]
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class OpCall:
    name: str  # e.g. lego::short_attention_bwd
    brick: str  # the brick shape it ran at, e.g. "r4 l2 S4 d1152"
    inputs: list
    outputs: list = dataclasses.field(default_factory=list)
    launches: list = dataclasses.field(default_factory=list)
    torch_bytes: int = 0  # bytes the op's PyTorch steps (sorts, reductions) move
    torch_ops: list = dataclasses.field(default_factory=list)


def _tensors(tree) -> list:
    import torch
    from torch.utils import _pytree

    return [t for t in _pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _key(t) -> tuple:
    """(storage identity, offset, bytes): tensors are kept alive for the whole capture, so identities are unique."""
    return (t.untyped_storage()._cdata, t.storage_offset(), t.numel() * t.element_size())


def _nbytes(tensors) -> int:
    """Bytes of the distinct tensors (the same storage range counted once)."""
    return sum(k[2] for k in {_key(t): None for t in tensors})


def _custom_ops():
    from torch._library.custom_ops import CustomOpDef

    for name in _KERNEL_MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if isinstance(obj, CustomOpDef):
                yield obj


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def triton_version() -> str:
    """major.minor of the Triton this process imports: the profile's file name and every row's "triton"."""
    import triton

    return ".".join(triton.__version__.split(".")[:2])


def profile_stem(version: str) -> str:
    return f"static-profile-triton{version}"


@contextlib.contextmanager
def capturing(calls: list, dtype: str = "bf16"):
    """Within: lego ops on meta tensors run their Triton launchers, whose launches are appended to ``calls``."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.jit import JITFunction

    import lego_kernels._dispatch as dispatch
    from lego import LegoBrick

    stack: list[OpCall] = []
    current = {"brick": "?"}
    no_traffic = {"empty", "empty_strided", "new_empty", "detach", "alias", "lift_fresh", "empty_like"}

    class TorchTraffic(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            # A view op moves nothing unless it had to copy: aten.to.dtype aliases in its schema but a cast copies.
            copied = not func.is_view or not {_key(t)[0] for t in _tensors(out)} & {_key(t)[0] for t in _tensors(args)}
            if stack and copied and name not in no_traffic:
                moved = _nbytes(_tensors((args, kwargs, out)))
                if moved:
                    stack[-1].torch_bytes += moved
                    stack[-1].torch_ops.append(name)
            return out

    def run(self, *args, grid, warmup, **kwargs):
        if not stack:
            raise RuntimeError(f"{self.__name__} was launched outside any lego:: op: the profile cannot place it")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        stack[-1].launches.append(Launch(self, grid, args, kwargs))

    def as_fake(op):
        def fake(*args, **kwargs):
            inputs = _tensors((args, kwargs))
            call = OpCall(op._qualname, current["brick"], inputs)
            stack.append(call)
            try:
                with TorchTraffic():
                    out = op._init_fn(*args, **kwargs)
            finally:
                stack.pop()
            call.outputs = _tensors(out)
            calls.append(call)
            return out

        return fake

    def brick_forward(forward):
        @functools.wraps(forward)
        def wrapped(self, x, prev, *args, **kwargs):
            current["brick"] = f"r{self.brick_size} l{self.field_size} S{self.seq_len} d{self.hidden_size}"
            # bf16 autocast makes a brick run its fused ops in bf16 (LegoBrick.forward); meta tensors have no
            # autocast, so the canvases come in as the profiled dtype instead.
            prev = None if prev is None else prev.to(torch_dtype(dtype))
            out = forward(self, x.to(torch_dtype(dtype)), prev, *args, **kwargs)
            if out.requires_grad:
                # The gradient of a brick's output is complete just before autograd enters that brick's backward
                # (its nodes are older than those of the bricks above): from here on, backward ops are this brick's.
                out.register_hook(lambda grad, label=current["brick"]: current.update(brick=label))
            return out

        return wrapped

    ops = list(_custom_ops())
    saved = [(op, op._abstract_fn) for op in ops]
    # Every op on Triton; outputs from torch.empty as in a real run (the tests' NaN poisoning would add fills).
    env = {"LEGO_KERNELS_BACKEND": "triton", "LEGO_KERNELS_POISON": "0"}
    saved_env = {k: os.environ.get(k) for k in env}
    with contextlib.ExitStack() as stack_ctx:
        stack_ctx.enter_context(mock.patch.object(JITFunction, "run", run))
        stack_ctx.enter_context(mock.patch.object(dispatch, "available_backends", lambda device: ["triton", "torch"]))
        stack_ctx.enter_context(mock.patch.object(LegoBrick, "forward", brick_forward(LegoBrick.forward)))
        os.environ.update(env)
        try:
            for op in ops:
                op._abstract_fn = as_fake(op)
            yield
        finally:
            for op, fn in saved:
                op._abstract_fn = fn
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def capture(model_name: str, batch: int, step: str, dtype: str = "bf16") -> list[OpCall]:
    """Every lego op call (with its Triton launches) of one training or sampling step of a model at a batch size, its
    fused ops in ``dtype`` ("bf16" or "fp32")."""
    import torch

    from lego import LegoLoss, LegoModel

    channels, canvas = MODELS[model_name]
    with torch.device("meta"):
        model = LegoModel.from_name(model_name, in_channels=channels, num_classes=NUM_CLASSES).to(torch_dtype(dtype))
        x = torch.empty(batch, channels, canvas, canvas, dtype=torch_dtype(dtype))
        labels = torch.zeros(batch, dtype=torch.long)
        sigma = torch.ones(batch)
    calls: list[OpCall] = []
    with capturing(calls, dtype):
        if step == "train":
            loss, _ = LegoLoss()(model, x, labels)
            loss.backward()
        else:
            with torch.no_grad():
                model(x, sigma, labels)
    return calls


# ----------------------------------------------------------------------------------------------------------------------
# Specialize and compile as Triton's launcher would.


class _Pointer:
    """What Triton's binder needs of a tensor: a dtype and an address (alignment is all that matters)."""

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self._address = (1 << 20) + tensor.storage_offset() * tensor.element_size()  # 512-byte aligned base

    def data_ptr(self):
        return self._address


def _unwrap(fn):
    while not hasattr(fn, "params"):  # @triton.autotune / @triton.heuristics wrappers
        fn = fn.fn
    return fn


@functools.cache
def _backend(cc: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", cc, 32))


def specialize(launch: Launch) -> tuple[tuple, dict]:
    """(specialization as Triton's binder makes it, launch options such as num_warps)."""
    import torch
    from triton.runtime.jit import create_function_from_signature

    fn = _unwrap(launch.fn)
    binder = create_function_from_signature(fn.signature, fn.params, _backend(90))
    args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = {k: _Pointer(v) if isinstance(v, torch.Tensor) else v for k, v in launch.kwargs.items()}
    _, spec, options = binder(*args, **kwargs)
    return tuple((kind, value) for kind, value in spec), dict(options)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_kernel(fn, spec: tuple, options: dict, cc: int) -> dict:
    """Compile one specialization for sm_<cc>; returns what the profile reads from the cubin, SASS and PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _unwrap(fn)
    backend = _backend(cc)
    names = [p.name for p in fn.params]
    signature = {n: kind for n, (kind, _) in zip(names, spec)}
    constexprs = {(i,): value for i, (kind, value) in enumerate(spec) if kind == "constexpr"}
    attrs = {
        (i,): backend.parse_attr(value)
        for i, (kind, value) in enumerate(spec)
        if kind != "constexpr" and isinstance(value, str)
    }
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32), options=options
    )
    meta = compiled.metadata
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = _run([_tool("cuobjdump"), "-res-usage", str(cubin)])
        sass = _run([_tool("cuobjdump"), "-sass", str(cubin)])
    res = next(iter(parse_resource_usage(usage).values()))
    instructions = next(iter(parse_sass(sass).values()))
    loads, stores = access_widths(instructions)
    atomics = sum(_base(_split(i)[0]) in ("RED", "REDG", "ATOM", "ATOMG") for i in instructions)
    # PTX parameters are the non-constexpr arguments in order; one the code never loads is unused at this launch.
    runtime = [n for n, (kind, _) in zip(names, spec) if kind != "constexpr"]
    used = {int(i) for i in re.findall(r"ld\.param\.[a-z0-9]+\s+%\w+,\s*\[\w+_param_(\d+)", compiled.asm["ptx"])}
    return {
        "registers": res.get("REG", 0),
        "spill_bytes": res.get("LOCAL", 0) + res.get("STACK", 0),
        "shared_bytes": meta.shared + res.get("SHARED", 0),
        "num_warps": meta.num_warps,
        "loads": loads,
        "stores": stores,
        "atomics": atomics,
        **load_rounds(instructions),
        "used_args": [runtime[i] for i in sorted(used) if i < len(runtime)],
    }


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


# ----------------------------------------------------------------------------------------------------------------------
# The profile.


def _kernel_id(fn, spec) -> str:
    """A readable name for one specialization: kernel plus its constexprs."""
    fn = _unwrap(fn)
    consts = [f"{p.name}={v}" for p, (kind, v) in zip(fn.params, spec) if kind == "constexpr" and p.is_constexpr]
    return f"{fn.__name__}[{', '.join(consts)}]"


def _atomic_bytes(spec: tuple, grid: tuple, bound: dict, compiled: dict) -> dict[str, int]:
    """{accumulator argument: L2 atomic bytes} of one launch, as its kernel declares it (module docstring, item 5)."""
    module, name, _, _ = spec
    declared = getattr(getattr(importlib.import_module(module), name), "atomic_bytes", None)
    if declared is None:
        if compiled["atomics"]:
            raise RuntimeError(f"{name} has {compiled['atomics']} global atomics in its SASS but declares no "
                               "atomic_bytes(grid, args): the profile cannot count its L2 atomic traffic")  # fmt: skip
        return {}
    return {arg: int(n) for arg, n in declared(grid, bound).items()}


def _compile_job(job) -> dict:
    module, name, spec, options, cc = job
    return compile_kernel(getattr(importlib.import_module(module), name), spec, options, cc)


def compile_all(jobs: list[tuple], workers: int, log=print) -> list[dict]:
    """compile_kernel over (module, kernel name, spec, options, cc) jobs, in forked worker processes when
    workers > 1."""
    if workers <= 1 or len(jobs) <= 1:
        return [_compile_job(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    log(f"compiling {len(jobs)} specializations on {workers} processes")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_job, jobs))


def build_profile(models=tuple(MODELS), batches=BATCHES, archs=ARCHS, workers=1, log=print, dtypes=DTYPES) -> dict:
    import torch
    import triton

    version = triton_version()

    # 1. Capture every scenario; specialize each launch as Triton's binder would.
    specs: dict[tuple, tuple] = {}  # compile key -> (module, kernel, spec, options)
    launches: dict[tuple, dict] = {}
    ops: dict[tuple, dict] = {}
    pending = []  # (op entry key, launch entry key, used-argument tensors per compile key)
    for model, batch, dtype, step in ((m, b, t, s) for m in models for b in batches for t in dtypes for s in STEPS):
        scenario = f"{model} b{batch} {dtype} {step}"
        calls = capture(model, batch, step, dtype)
        log(f"{scenario}: {len(calls)} op calls, {sum(len(c.launches) for c in calls)} launches")
        for call in calls:
            launch_keys = []
            for launch in call.launches:
                spec, options = specialize(launch)
                fn = _unwrap(launch.fn)
                kid = _kernel_id(fn, spec)
                ckey = (kid, repr(spec), repr(sorted(options.items())))
                specs.setdefault(ckey, (fn.__module__, fn.__name__, spec, options))
                lkey = (ckey, launch.grid, call.brick, dtype)
                entry = launches.setdefault(lkey, {
                    "kernel": fn.__name__, "specialization": kid, "op": call.name, "brick": call.brick,
                    "dtype": dtype, "triton": version, "grid": list(launch.grid),
                    "num_warps": options.get("num_warps", 4), "scenarios": [],
                })  # fmt: skip
                if scenario not in entry["scenarios"]:
                    entry["scenarios"].append(scenario)
                names = [p.name for p in fn.params]
                bound = dict(zip(names, launch.args)) | launch.kwargs
                if fn.__name__ in REDUCTIONS:
                    entry["reduction"] = REDUCTIONS[fn.__name__](bound)  # (groups, partial bytes)
                launch_keys.append((lkey, bound))
            okey = (call.name, call.brick, dtype, tuple(k for k, _ in launch_keys),
                    _nbytes(call.inputs + call.outputs))  # fmt: skip
            if okey not in ops:
                ops[okey] = {
                    "op": call.name, "brick": call.brick, "dtype": dtype, "triton": version,
                    "launches": [f"{k[0][0]} grid {tuple(k[1])}" for k, _ in launch_keys],
                    "torch_bytes": call.torch_bytes, "torch_ops": sorted(set(call.torch_ops)),
                    "min_bytes": okey[4], "scenarios": [],
                }  # fmt: skip
                pending.append((okey, launch_keys))
            if scenario not in ops[okey]["scenarios"]:
                ops[okey]["scenarios"].append(scenario)
        del calls  # the meta tensors of this scenario

    # 2. Compile each distinct specialization once per architecture.
    keys = list(specs)
    jobs = [(*specs[k], cc) for k in keys for cc in archs]
    log(f"{len(keys)} distinct specializations x {len(archs)} architectures")
    results = iter(compile_all(jobs, workers, log))
    compiled = {k: {cc: next(results) for cc in archs} for k in keys}

    # 3. Bytes: each launch moves the tensors its compiled code really uses (on the first architecture), once.
    for okey, launch_keys in pending:
        total = atomic = 0
        for lkey, bound in launch_keys:
            atomics = _atomic_bytes(specs[lkey[0]], lkey[1], bound, compiled[lkey[0]][archs[0]])
            used = [bound[n] for n in compiled[lkey[0]][archs[0]]["used_args"] if isinstance(bound.get(n), torch.Tensor)
                    and n not in atomics]  # fmt: skip
            launches[lkey]["bytes"] = _nbytes(used)
            launches[lkey]["op_min_bytes"] = min(launches[lkey].get("op_min_bytes", okey[4]), okey[4])
            total += launches[lkey]["bytes"]
            launches[lkey]["atomic_bytes"] = sum(atomics.values())
            atomic += launches[lkey]["atomic_bytes"]
        entry = ops[okey]
        entry["bytes"] = total + entry["torch_bytes"]
        entry["atomic_bytes"] = atomic
        entry["ratio"] = round(entry["bytes"] / entry["min_bytes"], 3) if entry["min_bytes"] else None

    launch_rows = []
    for (ckey, _, _, _), entry in launches.items():
        programs = math.prod(entry["grid"])
        entry["programs"] = programs
        entry["arch"] = {}
        for cc in archs:
            m = compiled[ckey][cc]
            ctas, limiter = resident_ctas(cc, m["registers"], 32 * m["num_warps"], m["shared_bytes"])
            per_wave = SM_LIMITS[cc]["sms"] * max(ctas, 1)
            # Two waves where each of their programs would still move >= 8 KB, and for a reduction only as many
            # programs as its partial sums leave within the bytes bound (programs_needed).
            needed = programs_needed(entry["bytes"], per_wave, entry.get("reduction"), entry["op_min_bytes"])
            entry["arch"][f"sm_{cc}"] = {
                **{k: v for k, v in m.items() if k != "used_args"},
                "ctas_per_sm": ctas,
                "occupancy_limit": limiter,
                "waves": round(programs / per_wave, 3),
                "work_allows_two_waves": needed >= 2 * per_wave,
                "programs_needed": needed,
            }
        launch_rows.append(entry)
    return {
        "what": "static profile of the Triton launches of LEGO training and sampling steps (no GPU; not a timing)",
        "versions": {"triton": triton.__version__, "torch": torch.__version__},
        "triton": version,
        "models": list(models),
        "batches": list(batches),
        "dtypes": list(dtypes),
        "archs": [f"sm_{cc}" for cc in archs],
        "launches": sorted(launch_rows, key=lambda e: (e["op"], e["brick"], e["dtype"], e["kernel"], e["programs"])),
        "ops": sorted(ops.values(), key=lambda e: (e["op"], e["brick"], e["dtype"], e["min_bytes"])),
    }


# ----------------------------------------------------------------------------------------------------------------------
# CUDA kernels: ptxas -v.


def cuda_resources(nvcc: str | None = None, arch: str = "sm_90a") -> list[dict] | str:
    """Registers, spills, static shared memory and global atomics of every kernel in csrc/*.cu, or why they could not be
    read. Atomics (RED / ATOM in the SASS) matter because a floating-point sum by atomics is not deterministic."""
    nvcc = nvcc or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        return "nvcc not found (looked on PATH and at /usr/local/cuda/bin/nvcc)"
    rows = []
    for source in sorted((_REPO / "csrc").glob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cmd = [nvcc, "-O3", f"-arch={arch}", "-std=c++20", "-Xptxas", "-v", f"-I{_REPO / 'csrc'}", "-cubin",
                   str(source), "-o", str(cubin)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                return f"nvcc failed on {source.name}: {done.stderr.strip()[-1000:]}"
            sass = parse_sass(_run([_tool("cuobjdump"), "-sass", str(cubin)]))
        for row in parse_ptxas(done.stderr):
            code = sass.get(row.pop("mangled"), [])
            atomics = [i for i in code if _base(_split(i)[0]) in ("RED", "REDG", "ATOM", "ATOMG")]
            rows.append(dict(row, file=source.name, float_atomics=sum(".F32" in i or ".F64" in i for i in atomics),
                             atomics=len(atomics), **load_rounds(code)))  # fmt: skip
    return rows


def parse_ptxas(text: str) -> list[dict]:
    """ptxas -v output -> one row per entry function: registers, spill stores/loads, stack, static shared memory."""
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = {"function": _demangle(m.group(1)), "mangled": m.group(1), "registers": 0, "spill_stores": 0,
                       "spill_loads": 0, "stack": 0, "shared_bytes": 0}  # fmt: skip
            rows.append(current)
        elif current is not None:
            for pattern, key in (
                (r"(\d+) bytes stack frame", "stack"),
                (r"(\d+) bytes spill stores", "spill_stores"),
                (r"(\d+) bytes spill loads", "spill_loads"),
                (r"Used (\d+) registers", "registers"),
                (r"(\d+) bytes smem", "shared_bytes"),
            ):
                m = re.search(pattern, line)
                if m:
                    current[key] = int(m.group(1))
    return rows


def _demangle(name: str) -> str:
    """'_ZN4lego...adaln_bwd_kernelI...' -> 'adaln_bwd_kernel<__nv_bfloat16, 8, 2, false>' (c++filt, when present)."""
    filt = shutil.which("c++filt")
    if not filt:
        return name
    out = subprocess.run([filt, name], capture_output=True, text=True, check=False).stdout.strip() or name
    out = out.replace("(anonymous namespace)::", "").replace("lego::", "").removeprefix("void ")
    return out[: out.rfind("(")] if out.endswith(")") else out


# ----------------------------------------------------------------------------------------------------------------------
# Report.


def _widths(counts: dict) -> str:
    return " ".join(f"{n}x{w}" for w, n in sorted(counts.items(), key=lambda kv: -int(kv[0]))) or "-"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


MAX_BYTES_RATIO = 1.1


def case_name(name: str, brick: str, dtype: str | None = None) -> str:
    """'_adaln_bwd_kernel', 'r4 l4 S1 d1152', 'fp32' -> 'adaln_bwd_kernel@r4-l4-S1-d1152@fp32': one kernel or op at one
    brick shape in one dtype."""
    return f"{name.removeprefix('lego::').strip('_')}@{brick.replace(' ', '-')}" + (f"@{dtype}" if dtype else "")


def rounds_case(e: dict) -> str | None:
    """The case of a launch that has to load all its inputs in one dependent round trip before its first store (the
    rounds check): the S <= 16 attention forward, and the gated adaLN forward (x, y and gate, then the stored x_out;
    the plain modulation's shift and scale are loaded after the LayerNorm's reductions). None for any other."""
    if e["kernel"] == "_short_attention_fwd_kernel":
        return case_name(e["kernel"], e["brick"], e["dtype"])
    if e["op"] == "lego::gated_residual_adaln_fwd":
        return case_name(e["op"], e["brick"], e["dtype"])
    return None


def violations(profile: dict, arch: str = "sm_90") -> dict[str, dict[str, str]]:
    """check -> {case: the worst figure} for the four checks of tests/test_static_profile.py."""
    out = {"spills": {}, "waves": {}, "bytes": {}, "rounds": {}}

    def worst(check, case, value, text):
        if case not in out[check] or value > out[check][case][0]:
            out[check][case] = (value, text)

    for e in profile["launches"]:
        a, case = e["arch"][arch], case_name(e["kernel"], e["brick"], e["dtype"])
        if a["spill_bytes"] or a["spill_instructions"]:
            worst("spills", case, a["spill_bytes"], f"{a['spill_bytes']} B local memory, {a['registers']} registers")
        if e["programs"] < a["programs_needed"]:
            worst("waves", case, -a["waves"], f"{e['programs']} programs = {a['waves']} waves, {a['programs_needed']} "
                  f"needed ({e['scenarios'][0]})")  # fmt: skip
        if rounds_case(e) and a["rounds_before_store"] > 1:
            worst("rounds", rounds_case(e), a["rounds_before_store"],
                  f"{a['rounds_before_store']} round trips before the store")  # fmt: skip
    for e in profile["ops"]:
        if e["ratio"] and e["ratio"] > MAX_BYTES_RATIO:
            worst("bytes", case_name(e["op"], e["brick"], e["dtype"]), e["ratio"],
                  f"{e['ratio']}x the minimum ({e['scenarios'][0]})")  # fmt: skip
    return {check: {case: text for case, (_, text) in sorted(found.items())} for check, found in out.items()}


def markdown(profile: dict) -> str:
    archs = profile["archs"]
    lines = [
        "# Static kernel profile",
        "",
        (
            f"{profile['what']}. Triton {profile['versions']['triton']}, torch {profile['versions']['torch']}. Models "
            f"{', '.join(profile['models'])} at batch {', '.join(map(str, profile['batches']))} in "
            f"{' and '.join(profile.get('dtypes', ['bf16']))}; a training step "
            "(forward + backward) and a sampling step (one denoiser call). Generated by `python -m benchmarks.static`; "
            "columns are explained in benchmarks/README.md."
        ),
        "",
    ]
    checks = {
        "spills": "local-memory spills",
        "waves": (
            "under two waves where the work allows more (>= 8 KB per program; for a reduction, as many programs "
            f"as its partial sums allow within {MAX_BYTES_RATIO}x the op's minimum bytes)"
        ),
        "bytes": f"more than {MAX_BYTES_RATIO}x the op's minimum bytes",
        "rounds": "S <= 16 attention and gated adaLN forward: more than one load round trip before the first store",
    }
    triton_version = profile.get("triton", profile["versions"]["triton"])
    for arch in archs:
        lines += [f"## Check failures, Triton {triton_version}, {arch} (what tests/test_static_profile.py gates)", ""]
        for check, found in violations(profile, arch).items():
            lines.append(f"- **{check}** ({checks[check]}): {len(found) or 'none'}")
            lines += [f"  - `{case}`: {text}" for case, text in found.items()]
        lines.append("")
    for arch in archs:
        lines += [
            f"## Triton launches, {arch}",
            "",
            (
                "| triton | dtype | target | op | brick | kernel | grid | programs | warps | regs | spill B | smem B | "
                "CTAs/SM (limit) | waves | LDG bits | STG bits | load rounds before 1st store / total | bars "
                "before store | "
                "MB moved | atomic MB (L2) | scenarios |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in profile["launches"]:
            a = e["arch"][arch]
            lines.append(
                f"| {e.get('triton', triton_version)} | {e.get('dtype', 'bf16')} | {arch} | "
                f"{e['op'].removeprefix('lego::')} | {e['brick']} | `{e['specialization']}` | {tuple(e['grid'])} | "
                f"{e['programs']} | {a['num_warps']} | {a['registers']} | {a['spill_bytes']} | {a['shared_bytes']} | "
                f"{a['ctas_per_sm']} ({a['occupancy_limit']}) | {a['waves']:g} | {_widths(a['loads'])} | "
                f"{_widths(a['stores'])} | {a['rounds_before_store']} / {a['rounds_total']} | "
                f"{a['barriers_before_store']} | {_mb(e['bytes'])} | {_mb(e.get('atomic_bytes', 0))} | "
                f"{len(e['scenarios'])} |"
            )
        lines.append("")
    lines += [
        "## Bytes per op call against the minimum",
        "",
        (
            "| triton | dtype | target | op | brick | MB moved | of which PyTorch steps | minimum MB | ratio | "
            "atomic MB (L2) | PyTorch steps | scenarios |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in profile["ops"]:
        lines.append(
            f"| {e.get('triton', triton_version)} | {e.get('dtype', 'bf16')} | {archs[0]} (bytes read from its code) | "
            f"{e['op'].removeprefix('lego::')} | {e['brick']} | {_mb(e['bytes'])} | {_mb(e['torch_bytes'])} | "
            f"{_mb(e['min_bytes'])} | {e['ratio']} | {_mb(e.get('atomic_bytes', 0))} | "
            f"{', '.join(e['torch_ops']) or '-'} | "
            f"{'; '.join(e['scenarios'])} |"
        )
    cuda = profile.get("cuda")
    lines += ["", "## CUDA kernels (csrc/), nvcc -O3 -arch=sm_90a -Xptxas -v", ""]
    if isinstance(cuda, list):
        lines += [
            (
                "| file | kernel | regs | spill stores B | spill loads B | stack B | static smem B | atomics (float) | "
                "load rounds before 1st store / total |"
            ),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['file']} | `{r['function']}` | {r['registers']} | {r['spill_stores']} | {r['spill_loads']} | "
            f"{r['stack']} | {r['shared_bytes']} | {r['atomics']} ({r['float_atomics']}) | "
            f"{r['rounds_before_store']} / {r['rounds_total']} |"
            for r in cuda
        ]
    else:
        lines.append(f"Not read: {cuda}.")
    return "\n".join(lines) + "\n"


def _kept_cuda_section(path: Path):
    """--no-cuda: the csrc/ figures of the profile already at ``path`` (they do not depend on the Triton capture), so
    regenerating the Triton part on a machine without nvcc keeps them; else a note that they were skipped."""
    try:
        kept = json.loads(path.read_text()).get("cuda")
    except (OSError, ValueError):
        kept = None
    return kept if isinstance(kept, list) else "skipped (--no-cuda)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to profile")
    p.add_argument("--batch", nargs="+", type=int, default=list(BATCHES), help="batch sizes")
    p.add_argument(
        "--arch",
        nargs="+",
        type=int,
        default=list(ARCHS),
        choices=list(SM_LIMITS),
        help="compute capabilities to compile for (the first one drives the byte count)",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        default=list(DTYPES),
        choices=list(DTYPES),
        help="dtypes the fused ops run in (bf16: autocast; fp32: the default training precision)",
    )
    p.add_argument(
        "--out",
        default=str(_RESULTS),
        help="folder for static-profile-triton<version>.json and .md (the version of the Triton imported)",
    )
    p.add_argument(
        "--no-cuda",
        action="store_true",
        help="skip the nvcc -Xptxas -v pass over csrc/ (keeps the csrc figures of a profile in --out)",
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: every core)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if min(args.batch) < 1 or args.jobs < 1:
        p.error("--batch and --jobs take positive numbers")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: TRITON_INTERPRET is set, but the profile compiles real kernels: run it with TRITON_INTERPRET=0",
              file=sys.stderr)  # fmt: skip
        return 2
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    profile = build_profile(tuple(args.model), tuple(args.batch), tuple(args.arch), args.jobs, log, tuple(args.dtype))
    out = Path(args.out)
    stem = profile_stem(profile["triton"])
    profile["cuda"] = _kept_cuda_section(out / f"{stem}.json") if args.no_cuda else cuda_resources()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(profile, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(profile))
    print(f"wrote {out / stem}.json and {out / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
