"""Test set-up shared by every test file.

Without a GPU the Triton kernels run on the CPU through Triton's interpreter; TRITON_INTERPRET is read when a kernel
module is imported, so it is set here, before anything imports lego_kernels.
"""

import os

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


def compile_for_gpu(kernel, signature, constexprs, capabilities=(80, 90)):
    """Compile a Triton kernel to PTX and cubin for each compute capability, without a GPU.

    The interpreter accepts programs that a real compile rejects (a tl.dot with K < 16, say); this catches them.
    signature maps every argument name to a Triton type ("*fp32", "i32", "constexpr", ...).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    # Under TRITON_INTERPRET=1, @triton.jit gives an InterpretedFunction: rebuild the real JITFunction from its source.
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    for cc in capabilities:
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32))
        assert "cubin" in compiled.asm, f"no cubin for sm_{cc}"
