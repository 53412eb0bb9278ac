"""Test set-up shared by every test file.

Without a GPU the Triton kernels run on the CPU through Triton's interpreter; TRITON_INTERPRET is read when a kernel
module is imported, so it is set here, before anything imports lego_kernels.
"""

import os

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN, so an element a kernel fails to write cannot pass by luck.
os.environ.setdefault("LEGO_KERNELS_POISON", "1")

# Devices a kernel test runs on: the interpreter on the CPU, the real thing on a GPU.
DEVICES = ["cuda"] if HAS_CUDA else ["cpu"]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close_to_reference(out, out_torch, out_fp64, atol, name="output"):
    """flash-attention's rule: the kernel's error against the fp64 reference is at most twice the error of plain
    PyTorch in the same dtype, plus atol (which covers dtypes where PyTorch itself is exact)."""
    assert out.shape == out_fp64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(out_fp64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out.double() - out_fp64).abs().max().item()
    err_torch = (out_torch.double() - out_fp64).abs().max().item()
    assert err <= 2 * err_torch + atol, f"{name}: max error {err:.3g} > 2 * torch's {err_torch:.3g} + {atol:g}"


_COMPILE_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

for module, name, signature, constexprs, options, capabilities in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(module), name)
    while not isinstance(kernel, JITFunction):  # unwrap @triton.autotune / @triton.heuristics
        kernel = kernel.fn
    for cc in capabilities:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
        assert "cubin" in compiled.asm, f"{name}: no cubin for sm_{cc}"
"""


def compile_for_gpu(*specs, capabilities=(80, 90)):
    """Compile Triton kernels to PTX and cubin for each compute capability, without a GPU.

    Each spec is ``(kernel, signature, constexprs)`` or ``(kernel, signature, constexprs, options)``: signature maps
    every argument name to a Triton type ("*fp32", "i32", "constexpr", ...), options are compile options such as
    ``{"num_warps": 8}``. The interpreter accepts programs a real compile rejects (a tl.dot with K < 16, say); this
    catches them. It runs in a child process without TRITON_INTERPRET: under the interpreter, tl.sum and the other
    jit-defined library functions are interpreted and cannot be compiled, and compiling next to them would leave
    triton.language patched for the rest of the test run.
    """
    import json
    import subprocess
    import sys

    jobs = []
    for kernel, signature, constexprs, *options in specs:
        fn = kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        jobs.append(
            [fn.__module__, fn.__name__, signature, constexprs, options[0] if options else {}, list(capabilities)]
        )
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(jobs)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def assert_one_line_error(capsys, code, *needles):
    """A command line's failure: exit code 2 and one ``prog: error: ...`` line on stderr (no traceback) that holds
    every needle; returns the line."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and ": error: " in err, err
    for needle in needles:
        assert needle in err, err
    return err


def save_digits(path, n: int) -> str:
    """The first n digits of the embedded default set as an .npz (uint8 images [n, H, W], labels [n]): a small real
    dataset for runs of lego.train in tests."""
    from lego.data.datasets import open_dataset

    data = open_dataset("default")
    images = ((data.images[:n, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    np.savez(path, images=images, labels=data.labels[:n].numpy())
    return str(path)
