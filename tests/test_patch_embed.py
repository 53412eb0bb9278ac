"""patch_embed: the fused Triton kernels (forward; the backward's one-pass kernel with atomics and its deterministic
two-kernel path) against the fp64 reference."""

import importlib

import pytest
import torch
from conftest import DEVICES, assert_close_to_reference, compile_for_gpu

import lego_kernels as lk
from lego_kernels import patch_embed, patch_embed_ref

pe = importlib.import_module("lego_kernels.patch_embed")  # the module (the package exports the function by that name)

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# (B, C, H, W, brick r, field l, d): non-square canvases, d not a multiple of the tiles.
CASES = [
    (3, 4, 16, 36, 4, 2, 40),  # XL's latent brick (S = 4); 108 sequences: two row blocks and two dweight splits
    (3, 3, 12, 20, 4, 4, 24),  # S = 1: one token per patch
    (2, 3, 16, 8, 8, 4, 24),  # brick 8, field 4
    (3, 1, 16, 32, 16, 8, 40),  # C = 1, field 8: K = (2 or 4) * 64, several K tiles
    (2, 2, 1, 5, 1, 1, 24),  # H = 1: the row coordinate is linspace(-1, 1, 1) = [-1]
]


def _inputs(b, c, h, w, r, l, d, has_prev, dtype, device, has_bias=True):
    c_in = c * (2 if has_prev else 1) + 2
    x = torch.randn(b, c, h, w, dtype=dtype, device=device)
    prev = torch.randn(b, c, h, w, dtype=dtype, device=device) if has_prev else None
    weight = torch.randn(d, c_in, l, l, dtype=dtype, device=device) / (c_in * l * l) ** 0.5
    bias = torch.randn(d, dtype=dtype, device=device) if has_bias else None
    pos_embed = torch.randn((r // l) ** 2, d, dtype=dtype, device=device)
    return [x, prev, weight, bias, pos_embed]


def _random_subset(b, num_patches, fraction, dtype, device):
    """[B, P] distinct patch ids per image, a random subset in random order."""
    p = max(1, round(num_patches * fraction))
    return torch.stack([torch.randperm(num_patches)[:p] for _ in range(b)]).to(device=device, dtype=dtype)


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _check(tensors, r, l, patch_index, atol, backend="triton"):
    """Forward and every gradient (x, prev, weight, bias, pos_embed) of the kernel against the fp64 reference, with
    plain PyTorch in the same dtype as the yardstick."""
    names = ["x", "prev", "weight", "bias", "pos_embed"]
    kernel, torch_same, fp64 = _leaves(tensors), _leaves(tensors), _leaves(tensors, torch.float64)
    out = patch_embed(*kernel, r, l, patch_index, backend=backend)
    out_torch = patch_embed_ref(*torch_same, r, l, patch_index)
    out_fp64 = patch_embed_ref(*fp64, r, l, patch_index)
    assert_close_to_reference(out, out_torch, out_fp64, atol, "tokens")
    grad = torch.randn_like(out)
    out.backward(grad)
    out_torch.backward(grad)
    out_fp64.backward(grad.double())
    for name, a, b, c in zip(names, kernel, torch_same, fp64):
        if a is not None:
            assert_close_to_reference(a.grad, b.grad, c.grad, atol, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("indexed", [False, True], ids=["all-patches", "patch-index"])
@pytest.mark.parametrize("has_prev", [False, True], ids=["no-prev", "prev"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-C{}-{}x{}-r{}-l{}-d{}".format(*c))
@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_matches_reference(device, case, has_prev, indexed, dtype, monkeypatch):
    """The forward and the fused backward (which these small shapes, few tokens against K, would mostly not take)."""
    monkeypatch.setattr(pe, "_TWO_PASS_TOKENS_PER_K", 0)
    b, c, h, w, r, l, d = case
    tensors = _inputs(b, c, h, w, r, l, d, has_prev, dtype, device)
    # int32 ids with fp16 and int64 with fp32, so both index dtypes run.
    index_dtype = torch.int32 if dtype == torch.float16 else torch.int64
    patch_index = _random_subset(b, (h // r) * (w // r), 2 / 3, index_dtype, device) if indexed else None
    _check(tensors, r, l, patch_index, ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_without_bias(device):
    tensors = _inputs(2, 3, 8, 12, 4, 2, 24, True, torch.float32, device, has_bias=False)
    _check(tensors, 4, 2, _random_subset(2, 6, 0.5, torch.int64, device), ATOL[torch.float32])


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test: the backward takes its two-kernel path."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_one_weight_split(device, monkeypatch, deterministic):
    """The two-kernel path's dweight/dpos with a single split, so one program sums several row blocks (small CPU
    shapes get one per split)."""
    monkeypatch.setattr(pe, "_BWD_WEIGHT_PROGRAMS", 1)
    tensors = _inputs(3, 4, 16, 36, 4, 2, 40, True, torch.float32, device)
    _check(tensors, 4, 2, _random_subset(3, 36, 0.9, torch.int64, device), ATOL[torch.float32])


def _spy_backward_paths(monkeypatch) -> list[str]:
    """The backward paths taken, in call order ("fused" or "two_pass")."""
    taken = []
    for name in ("fused", "two_pass"):
        fn = getattr(pe, f"_patch_embed_bwd_{name}")
        monkeypatch.setattr(pe, f"_patch_embed_bwd_{name}", lambda *a, fn=fn, name=name, **kw: taken.append(name)
                            or fn(*a, **kw))  # fmt: skip
    return taken


def _spy_launches(monkeypatch) -> list[tuple]:
    """(kernel name, grid) of every backward kernel launch. The kernels' class is patched, not the kernel objects: an
    instance attribute that monkeypatch puts back would shadow the class's run for every later test."""
    launched, names = [], {"_patch_embed_bwd_kernel", "_patch_embed_bwd_weight_kernel", "_patch_embed_bwd_input_kernel"}
    kernel_class = type(pe._patch_embed_bwd_kernel)
    real_run = kernel_class.run

    def run(self, *a, grid, **kw):
        if self.__name__ in names:
            launched.append((self.__name__, tuple(grid)))
        return real_run(self, *a, grid=grid, **kw)

    monkeypatch.setattr(kernel_class, "run", run)
    return launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-C{}-{}x{}-r{}-l{}-d{}".format(*c))
@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_deterministic_path_matches_reference(device, case, dtype, deterministic, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backward runs the two kernels without atomics; every
    gradient still matches, with prev and a patch subset."""
    taken = _spy_backward_paths(monkeypatch)
    b, c, h, w, r, l, d = case
    tensors = _inputs(b, c, h, w, r, l, d, True, dtype, device)
    _check(tensors, r, l, _random_subset(b, (h // r) * (w // r), 2 / 3, torch.int64, device), ATOL[dtype])
    assert taken == ["two_pass"]


@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_default_backward_is_one_kernel(device, monkeypatch):
    """By default the backward is the fused kernel alone: one launch reads dtok once for dx, dprev, dweight, dbias and
    dpos_embed."""
    taken, launched = _spy_backward_paths(monkeypatch), _spy_launches(monkeypatch)
    tensors = _inputs(3, 4, 16, 36, 4, 2, 40, True, torch.float32, device)  # 324 tokens >= 4 x K = 160
    _check(tensors, 4, 2, _random_subset(3, 36, 0.75, torch.int64, device), ATOL[torch.float32])
    assert taken == ["fused"] and [name for name, _ in launched] == ["_patch_embed_bwd_kernel"]


@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_few_tokens_take_two_kernels(device, monkeypatch):
    """With fewer tokens than 4 x K (here 24 against K = 4 x 64), reading dtok twice moves less than the fused kernel's
    fp32 dweight accumulator: dweight in one piece from the first kernel (grid z = 1), then dx/dprev."""
    taken, launched = _spy_backward_paths(monkeypatch), _spy_launches(monkeypatch)
    tensors = _inputs(3, 1, 16, 32, 16, 8, 40, True, torch.float16, device)
    _check(tensors, 16, 8, _random_subset(3, 2, 1, torch.int64, device), ATOL[torch.float16])
    assert taken == ["two_pass"]
    assert [name for name, _ in launched] == ["_patch_embed_bwd_weight_kernel", "_patch_embed_bwd_input_kernel"]
    assert launched[0][1][2] == 1


def _check_weight_gradients(tensors, r, l, patch_index, atol):
    """With x and prev needing no gradient (a bottom brick's noisy input): dweight, dbias and dpos_embed against the
    fp64 reference, with plain PyTorch in the same dtype as the yardstick; returns the tokens."""
    x, prev, *params = tensors
    kernel, torch_same, fp64 = _leaves(params), _leaves(params), _leaves(params, torch.float64)
    out = patch_embed(x, prev, *kernel, r, l, patch_index, backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    patch_embed_ref(x, prev, *torch_same, r, l, patch_index).backward(grad)
    wide = [None if t is None else t.double() for t in (x, prev)]
    patch_embed_ref(*wide, *fp64, r, l, patch_index).backward(grad.double())
    for name, a, b, c in zip(("dweight", "dbias", "dpos_embed"), kernel, torch_same, fp64):
        assert_close_to_reference(a.grad, b.grad, c.grad, atol, name)
    return out


@pytest.mark.parametrize("indexed", [False, True], ids=["all-patches", "patch-index"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-C{}-{}x{}-r{}-l{}-d{}".format(*c))
@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_weight_only_backward(device, case, indexed, monkeypatch):
    """Where neither x nor prev needs a gradient (the bottom brick's noisy input), the backward is the weight kernel
    alone, its token splits (down to one 16-sequence block and one token position each here) summed with fp32 atomics
    (or written directly when there is one): dweight, dbias and dpos_embed still match."""
    monkeypatch.setattr(pe, "_bwd_weight_config", lambda d, k, dtype: {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
    taken, launched = _spy_backward_paths(monkeypatch), _spy_launches(monkeypatch)
    b, c, h, w, r, l, d = case
    tensors = _inputs(b, c, h, w, r, l, d, True, torch.float32, device)
    patch_index = _random_subset(b, (h // r) * (w // r), 2 / 3, torch.int64, device) if indexed else None
    out = _check_weight_gradients(tensors, r, l, patch_index, ATOL[torch.float32])
    assert taken == [] and [name for name, _ in launched] == ["_patch_embed_bwd_weight_kernel"]
    n, s = out.shape[:2]
    # A split per sequence block and token position (one split, H = 1: dweight written directly, no atomics).
    assert launched[0][1][2] == triton_cdiv(n, 16) * s


@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_weight_only_backward_deterministic(device, monkeypatch, deterministic):
    """Under torch.use_deterministic_algorithms(True), no input gradient still means fixed-order fp32 partials (the
    two-kernel path's first kernel alone), not atomics."""
    taken, launched = _spy_backward_paths(monkeypatch), _spy_launches(monkeypatch)
    tensors = _inputs(3, 4, 16, 36, 4, 2, 40, False, torch.float32, device)
    _check_weight_gradients(tensors, 4, 2, None, ATOL[torch.float32])
    assert taken == ["two_pass"] and [name for name, _ in launched] == ["_patch_embed_bwd_weight_kernel"]


# (B, C, H, W, r, l, d): S = 16 tokens over 4 patches (tiles of 4 patches x 4 token positions, 4 token blocks), XL's
# latent brick (7 patch blocks of 16 at each of 4 token positions), and field 8 (2 tiles of 8 patches x 2 token
# positions, 4 K tiles of 64).
SMALL_TILE_CASES = [(2, 2, 8, 16, 8, 2, 24), (3, 4, 16, 36, 4, 2, 40), (3, 1, 16, 32, 16, 8, 40)]


@pytest.mark.parametrize("case", SMALL_TILE_CASES, ids=lambda c: "B{}-C{}-{}x{}-r{}-l{}-d{}".format(*c))
@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_fused_backward_small_tiles(device, case, monkeypatch):
    """Tiles of 16 rows, so that many programs add into the same dweight, dpos_embed and dbias entries with atomics
    (the CPU shapes otherwise fit a token position in one tile), and tiles span several token positions."""
    monkeypatch.setattr(pe, "_BWD_ROWS", (16,))
    monkeypatch.setattr(pe, "_TWO_PASS_TOKENS_PER_K", 0)
    taken = _spy_backward_paths(monkeypatch)
    b, c, h, w, r, l, d = case
    g, s = b * (h // r) * (w // r), (r // l) ** 2
    cfg = pe._bwd_config(g, s, d, (2 * c + 2) * l * l, torch.float32)
    assert triton_cdiv(g, cfg["BLOCK_P"]) * triton_cdiv(s, cfg["BLOCK_S"]) >= 2
    tensors = _inputs(b, c, h, w, r, l, d, True, torch.float32, device)
    _check(tensors, r, l, _random_subset(b, (h // r) * (w // r), 3 / 4, torch.int64, device), ATOL[torch.float32])
    assert taken == ["fused"]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_patch_embed_backward_tiles_at_model_shapes():
    """The fused backward's tile at the model bricks (B 64 and 256): the most programs whose L2 atomic traffic stays
    within _ATOMIC_SHARE of dtok's bytes; where K is too large for that at 128 rows (fields of 4 x 4 and 8 x 8), 128."""
    # (canvas patches at B 64, tokens per patch, d, K): XL image brick (with prev), XL 4 x 4 brick (no prev, S = 1),
    # XL 8 x 8 brick, XL-U 16 x 16 brick (field 8), S image brick, S 4 x 4 brick (no prev).
    shapes = [(64, 256, 1152, 40), (4096, 1, 1152, 96), (1024, 4, 1152, 160), (256, 4, 1152, 640),
              (64, 1024, 384, 32), (16384, 4, 384, 20)]  # fmt: skip
    for batch_scale in (1, 4):
        for g, s, d, k in shapes:
            cfg = pe._bwd_config(g * batch_scale, s, d, k, torch.bfloat16)
            rows = cfg["BLOCK_P"] * cfg["BLOCK_S"]
            share = 2 * (k + cfg["BLOCK_S"] + 1) / rows  # atomic bytes over dtok bytes (pe._bwd_atomic_bytes)
            assert rows in pe._BWD_ROWS and cfg["BLOCK_S"] <= s, (g, s, d, k, cfg)
            if 2 * (k + 2) <= pe._ATOMIC_SHARE * pe._BWD_ROWS[-1]:
                assert share <= pe._ATOMIC_SHARE, cfg
                assert rows == pe._BWD_ROWS[0] or 2 * (k + 2) > pe._ATOMIC_SHARE * rows // 2, cfg  # the fewest rows
            else:
                assert rows == pe._BWD_ROWS[-1], cfg
    # The share as the profile counts it: one tile of the XL image brick at B 256 (128 patches at one token position).
    cfg = pe._bwd_config(256, 256, 1152, 40, torch.bfloat16)
    grid = (2 * 1, 256)  # (patch blocks x K tiles, token blocks)
    assert (cfg["BLOCK_P"], cfg["BLOCK_S"], cfg["BLOCK_K"]) == (128, 1, 64)
    args = {"d": 1152, "K": 40, "ACC_STRIDE": 40, "BLOCK_S": 1, "BLOCK_K": 64}
    atomic = sum(pe._bwd_atomic_bytes(grid, args).values())
    assert atomic == 512 * 1152 * (40 + 2) * 4 and atomic <= pe._ATOMIC_SHARE * 256 * 256 * 1152 * 2


@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_small_grid_takes_fewer_sequences_per_program(device, monkeypatch):
    """The forward's GPU rule for small grids, run here too: 108 sequences at 16 per program (7 row blocks, the last
    one partial). XL's 16 x 16 brick at B 64 (256 sequences, 4 tokens, 9 column blocks) reaches 576 programs."""
    monkeypatch.setattr(pe, "interpreting", lambda: False)
    assert pe._fwd_block_m(256, 4 * 9, 64) == 16  # 144 programs at 64
    assert pe._fwd_block_m(1024, 4 * 9, 64) == 64  # B 256: 576 programs already
    assert pe._fwd_block_m(108, 4, 64) == 16
    tensors = _inputs(3, 4, 16, 36, 4, 2, 40, True, torch.float32, device)
    _check(tensors, 4, 2, _random_subset(3, 36, 0.9, torch.int64, device), ATOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_gradients_only_where_required(device):
    """dx/dprev are computed only when one of them requires grad; each of them alone still comes out right."""
    x, prev, weight, bias, pos_embed = _inputs(2, 3, 8, 12, 4, 2, 24, True, torch.float32, device)
    patch_index = _random_subset(2, 6, 0.5, torch.int64, device)
    grad = torch.randn(6, 4, 24, device=device)
    for wanted in ("weight", "prev"):
        leaves = {"x": x, "prev": prev, "weight": weight, "bias": bias, "pos_embed": pos_embed}
        leaves[wanted] = leaves[wanted].detach().clone().requires_grad_()
        ref = {k: v.detach().double().requires_grad_(k == wanted) for k, v in leaves.items()}
        patch_embed(*leaves.values(), 4, 2, patch_index, backend="triton").backward(grad)
        patch_embed_ref(*ref.values(), 4, 2, patch_index).backward(grad.double())
        torch.testing.assert_close(leaves[wanted].grad.double(), ref[wanted].grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_torch_compile(device):
    """The custom ops trace without graph breaks (fake impls, registered autograd), for both backends."""
    tensors = _inputs(2, 3, 8, 12, 4, 2, 24, True, torch.float32, device)
    patch_index = _random_subset(2, 6, 0.5, torch.int64, device)
    for backend in ("triton", "torch"):
        torch._dynamo.reset()

        def step(x, prev, weight, bias, pos_embed, patch_index, backend=backend):
            return patch_embed(x, prev, weight, bias, pos_embed, 4, 2, patch_index, backend=backend).square().sum()

        eager, compiled = _leaves(tensors), _leaves(tensors)
        step(*eager, patch_index).backward()
        torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled, patch_index).backward()
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("fused", [False, True], ids=["two-kernels", "fused"])
@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_opcheck(device, fused, monkeypatch):
    """Fake and real implementations agree, for both backward paths (24 tokens < 4 x K picks the two kernels)."""
    if fused:
        monkeypatch.setattr(pe, "_TWO_PASS_TOKENS_PER_K", 0)
    x, prev, weight, bias, pos_embed = _inputs(2, 3, 8, 12, 4, 2, 24, True, torch.float32, device)
    patch_index = _random_subset(2, 6, 0.5, torch.int64, device)
    weight.requires_grad_()
    torch.library.opcheck(pe._patch_embed_fwd_op, (x, prev, weight, bias, pos_embed, patch_index, 4, 2))
    dtokens = torch.randn(6, 4, 24, device=device)  # the backward op has no double backward: no grads here
    torch.library.opcheck(pe._patch_embed_bwd_op, (dtokens, x, prev, weight.detach(), patch_index, 4, 2, True))


def test_patch_embed_torch_and_auto_on_cpu_are_the_reference():
    tensors = _inputs(2, 3, 8, 12, 4, 2, 24, True, torch.float32, "cpu")
    ref = patch_embed_ref(*tensors, 4, 2)
    assert torch.equal(patch_embed(*tensors, 4, 2, backend="torch"), ref)
    assert torch.equal(patch_embed(*tensors, 4, 2, backend="auto"), ref)


def test_patch_embed_bad_shapes_and_backends(monkeypatch):
    x, prev, weight, bias, pos_embed = _inputs(2, 3, 8, 12, 4, 2, 24, True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight has shape"):
        patch_embed(x, None, weight, bias, pos_embed, 4, 2, backend="triton")  # weight expects prev's channels
    with pytest.raises(ValueError, match="not divisible by the brick size"):
        patch_embed(x[..., :10], prev[..., :10], weight, bias, pos_embed, 4, 2, backend="triton")
    with pytest.raises(ValueError, match="pos_embed has shape"):
        patch_embed(x, prev, weight, bias, pos_embed[:3], 4, 2, backend="triton")
    with pytest.raises(TypeError, match="pos_embed must be a torch.Tensor, got list"):
        patch_embed(x, prev, weight, bias, pos_embed.tolist(), 4, 2)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got list"):
        patch_embed(x, prev, weight, bias.tolist(), pos_embed, 4, 2)
    for backend in ("torch", "triton"):  # d = 0: a conv2d error in the reference, an IndexError in the kernels
        with pytest.raises(ValueError, match="weight has shape \\(0, 8, 2, 2\\), no output channels"):
            patch_embed(x, prev, weight[:0], bias[:0], pos_embed[:, :0], 4, 2, backend=backend)
    with pytest.raises(TypeError, match="patch_index must be a torch.Tensor, got list"):
        patch_embed(x, prev, weight, bias, pos_embed, 4, 2, [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="the canvas 0x12 has no pixels"):
        patch_embed(x[:, :, :0], prev[:, :, :0], weight, bias, pos_embed, 4, 2)
    with pytest.raises(ValueError, match="backend 'cuda' is not available"):
        patch_embed(x, prev, weight, bias, pos_embed, 4, 2, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' is not available"):
        patch_embed(x, prev, weight, bias, pos_embed, 4, 2, backend="triton")


# ----------------------------------------------------------------------------------------------------------------------
# Compile-only: the real compiler rejects what the interpreter lets through (tl.dot shapes, types). Configurations are
# the launchers' own, at XL's shape (d = 1152, C = 4 with prev, brick 4, field 2) and at a field-8 brick.


def _signature(kernel, pointers, floats=()):
    """Triton types in the kernel's argument order: the given pointers, fp32 floats, constexprs, i32 otherwise."""
    constexprs = {"T", "L", "HAS_PREV", "HAS_BIAS", "HAS_INDEX", "DOT_PRECISION", "BLOCK_M", "BLOCK_N",
                  "BLOCK_K", "BLOCK_P", "BLOCK_S", "ACC_STRIDE", "ATOMIC"}  # fmt: skip
    return {
        name: pointers.get(name) or ("fp32" if name in floats else "constexpr" if name in constexprs else "i32")
        for name in kernel.arg_names
    }


# (dtype, (C, field l, prev)): XL's latent brick, and a field-8 brick (several K tiles) for fp16.
COMPILE_CASES = [("fp32", (4, 2, True)), ("fp16", (1, 8, False)), ("bf16", (4, 2, True))]


def _compile_spec(kernel, dtype, shape):
    """(kernel, signature, constexprs) of one kernel with the launcher's configuration at d = 1152."""
    d, (c, l, has_prev) = 1152, shape
    k = (2 * c if has_prev else c) * l * l + 2 * l * l
    flags = {
        "T": 2,
        "L": l,
        "HAS_PREV": has_prev,
        "HAS_INDEX": True,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
    }
    t, torch_dtype = f"*{dtype}", {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    steps = ("row_step", "col_step")
    if kernel == "fwd":
        fn = pe._patch_embed_fwd_kernel
        ptrs = {"X": t, "PREV": t, "WEIGHT": t, "BIAS": t, "POS": t, "INDEX": "*i64", "OUT": t}
        constexprs = {**flags, "HAS_BIAS": True, **pe._fwd_config(d, k, torch_dtype)}
        return fn, _signature(fn, ptrs, steps), constexprs, {"num_warps": pe._FWD_WARPS}
    if kernel == "bwd":  # the fused backward at the image brick's tile (B 256: 256 canvas patches of 256 tokens)
        fn = pe._patch_embed_bwd_kernel
        ptrs = {"DTOK": t, "X": t, "PREV": t, "WEIGHT": t, "INV": "*i32", "DCANVAS": t, "DW_ACC": "*fp32",
                "DPOS_ACC": "*fp32", "DB_ACC": "*fp32"}  # fmt: skip
        cfg = pe._bwd_config(256, 256, d, k, torch_dtype)
        options = {"num_warps": cfg.pop("num_warps")}
        constexprs = {**flags, "ACC_STRIDE": -(-k // 4) * 4, **cfg}
        return fn, _signature(fn, ptrs, steps), constexprs, options
    if kernel.startswith("bwd_weight"):  # fp32 partials (deterministic), or with atomics into one accumulator
        fn = pe._patch_embed_bwd_weight_kernel
        ptrs = {"DTOK": t, "X": t, "PREV": t, "INDEX": "*i64", "DW_PART": "*fp32", "DPOS_PART": "*fp32",
                "DB_ACC": "*fp32"}  # fmt: skip
        atomic = kernel.endswith("atomic")
        constexprs = {**flags, "ATOMIC": atomic, "ACC_STRIDE": -(-k // 4) * 4 if atomic else k}
        cfg = pe._bwd_weight_config(d, k, torch_dtype)
        options = {"num_warps": cfg.pop("num_warps")} if "num_warps" in cfg else {}
        return fn, _signature(fn, ptrs, steps), {**constexprs, **cfg}, options
    fn = pe._patch_embed_bwd_input_kernel
    ptrs = {"DTOK": t, "WEIGHT": t, "INV": "*i32", "DCANVAS": t}
    del flags["HAS_PREV"]
    return fn, _signature(fn, ptrs), {**flags, **pe._bwd_input_config(d, k - 2 * l * l, torch_dtype)}


def test_patch_embed_kernels_compile():
    """The four kernels (the weight kernel in both modes) in every dtype for sm_90 (H100/H200), and in bf16, the
    training dtype, for sm_80 too."""
    pytest.importorskip("triton")
    kernels = ["fwd", "bwd", "bwd_weight", "bwd_weight_atomic", "bwd_input"]
    compile_for_gpu(*[_compile_spec(k, dt, shape) for dt, shape in COMPILE_CASES for k in kernels], capabilities=(90,))
    bf16 = [_compile_spec(k, dt, shape) for dt, shape in COMPILE_CASES if dt == "bf16" for k in kernels]
    compile_for_gpu(*bf16, capabilities=(80,))


# ----------------------------------------------------------------------------------------------------------------------
# GPU: the XL latent brick at training size (B = 256, 32x32x4, brick 4, field 2, d = 1152, with prev).


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("indexed", [False, True], ids=["all-patches", "patch-index"])
def test_patch_embed_xl_on_gpu(indexed, dtype):
    b, c, h, w, r, l, d = 256, 4, 32, 32, 4, 2, 1152
    tensors = _inputs(b, c, h, w, r, l, d, True, dtype, "cuda")
    patch_index = _random_subset(b, 64, 0.75, torch.int64, "cuda") if indexed else None
    _check(tensors, r, l, patch_index, ATOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("batch", "brick", "field"), [(256, 4, 4), (64, 32, 2)], ids=["XL-PG-r4-l4", "XL-U-r32-l2"])
def test_patch_embed_weight_only_backward_on_gpu(batch, brick, field, dtype):
    """The bottom bricks' backward (no input gradient: the weight kernel alone, fp32 atomics) at model shapes:
    LEGO-XL-PG-32's 4 x 4 brick of 4 x 4 fields (S = 1) at B 256 and LEGO-XL-U-32's 32 x 32 brick (S = 256) at B 64."""
    tensors = _inputs(batch, 4, 32, 32, brick, field, 1152, False, dtype, "cuda")
    _check_weight_gradients(tensors, brick, field, None, ATOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("indexed", [False, True], ids=["all-patches", "patch-index"])
def test_patch_embed_deterministic_backward_on_gpu(indexed, deterministic):
    """Under torch.use_deterministic_algorithms(True), the backward at the XL image brick (B 64, 32 x 32 x 4 with prev,
    field 2, S = 256) is bitwise the same run after run, and matches the reference."""
    b, c, h, w, r, l, d = 64, 4, 32, 32, 32, 2, 1152
    tensors = _inputs(b, c, h, w, r, l, d, True, torch.bfloat16, "cuda")
    patch_index = torch.zeros(b, 1, dtype=torch.int64, device="cuda") if indexed else None
    grad = torch.randn(b, (r // l) ** 2, d, dtype=torch.bfloat16, device="cuda")
    runs = []
    for _ in range(3):
        leaves = _leaves(tensors)
        patch_embed(*leaves, r, l, patch_index, backend="triton").backward(grad)
        runs.append([t.grad for t in leaves])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))
    _check(tensors, r, l, patch_index, ATOL[torch.bfloat16])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_embed_bad_patch_ids(backend):
    """Patch ids outside 0..P_all-1 or repeated within an image are refused on every backend with one line that names
    the id (the Triton kernels would embed zeros for an id out of range, the reference wraps -1 to the last patch, and
    a repeated id leaves the canvas gradient to whichever sequence wrote last)."""
    tensors = _inputs(2, 3, 8, 12, 4, 2, 24, True, torch.float32, "cpu")  # 6 patches per image
    for ids, match in [([[0, 6], [1, 2]], "patch_index holds 6, outside 0..5"),
                       ([[0, -1], [1, 2]], "patch_index holds -1, outside 0..5"),
                       ([[1, 2], [4, 4]], "row 1 lists patch 4 twice")]:  # fmt: skip
        with pytest.raises(ValueError, match=match) as err:
            patch_embed(*tensors, 4, 2, torch.tensor(ids), backend=backend)
        assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_patch_embed_float64_takes_the_reference(device):
    """float64 inputs run the reference on every backend, forward and gradients, as adaln's do (the kernels compute in
    fp32 at best; under the interpreter their float64 forward returned garbage)."""
    tensors = _leaves(_inputs(2, 3, 8, 12, 4, 2, 24, True, torch.float64, device))
    same = _leaves(tensors)
    patch_index = _random_subset(2, 6, 0.5, torch.int64, device)
    out = patch_embed(*tensors, 4, 2, patch_index, backend="triton")
    ref = patch_embed_ref(*same, 4, 2, patch_index)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(tensors, same):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)


def test_patch_embed_on_meta_tensors_with_patch_index():
    """Shape-only runs on the meta device (benchmarks/static.py captures a training step that way) keep working with
    a patch_index: its values, which meta tensors lack, are checked only where they exist."""
    with torch.device("meta"):
        tensors = _inputs(2, 3, 8, 12, 4, 2, 24, True, torch.float32, "meta")
        patch_index = torch.zeros(2, 3, dtype=torch.long)
        tokens = torch.empty(6, 4, 2 * 2 * 3)
    assert patch_embed(*tensors, 4, 2, patch_index).shape == (6, 4, 24)
    assert lk.patch_unembed(tokens, 4, 2, 3, 8, 12, patch_index).shape == (2, 3, 8, 12)


@pytest.mark.cuda
def test_patch_embed_captures_in_a_cuda_graph_with_patch_index():
    """The patch-id check reads the ids on the host, which CUDA graph capture forbids: it steps aside while capturing,
    so a brick's patch_embed and patch_unembed with a patch_index still capture (and replay the eager result)."""
    tensors = _inputs(2, 3, 8, 12, 4, 2, 24, True, torch.float32, "cuda")
    patch_index = _random_subset(2, 6, 0.5, torch.int64, "cuda")
    tokens = torch.randn(6, 4, 12, device="cuda")

    def step():
        return patch_embed(*tensors, 4, 2, patch_index), lk.patch_unembed(tokens, 4, 2, 3, 8, 12, patch_index)

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b)
