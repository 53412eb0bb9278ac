"""adaln_modulate and gated_residual_adaln: the fused backends against the fp64 reference, forward and every gradient.

Without a GPU the Triton kernels run through the interpreter on small odd shapes; the `cuda`-marked tests repeat the
comparisons on the GPU with bf16 and the model's shapes.
"""

import pytest
import torch
from conftest import DEVICES, assert_close_to_reference, compile_for_gpu

from lego_kernels import adaln, available_backends
from lego_kernels.adaln import adaln_modulate, adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref

# (B, N, S, d): images, sequences, tokens per sequence, hidden size. Odd widths exercise the masked tail.
SHAPES = [(3, 15, 4, 40), (3, 15, 1, 72), (3, 15, 7, 100), (1, 7, 5, 33)]
# The model's shapes (GPU only): 4x4 patch-brick of XL, S-size brick, the XL 4x4 brick with S = 1.
MODEL_SHAPES = [(64, 64 * 64, 4, 1152), (32, 32 * 16, 16, 384), (16, 16 * 256, 1, 1024)]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _image_index(index, num_images, num_seq, device):
    """None, or a random mapping of the sequences onto the images that leaves one image without sequences."""
    if index is None:
        return None
    used = [b for b in range(num_images) if b != num_images // 2] if num_images > 1 else [0]
    pick = torch.randint(0, len(used), (num_seq,))
    ids = torch.tensor(used)[pick]
    return ids.to(device=device, dtype=torch.int32 if index == "int32" else torch.int64)


def _vectors(num_images, d, count, dtype, device):
    # Random, not the adaLN-Zero init: a zero scale or gate would hide a wrong term.
    return [torch.randn(num_images, d, dtype=dtype, device=device) for _ in range(count)]


def _run(fn, inputs, upstream):
    """Outputs of fn(*inputs) and the gradients of every input under the given upstream gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, upstream) if g is not None]
    grads = torch.autograd.grad(
        [o for o, _ in pairs], leaves, [g.to(o.dtype) for o, g in pairs], allow_unused=True, materialize_grads=True
    )
    return [o.detach() for o in outs], list(grads)


def _compare(fused, torch_same, fp64, dtype, names):
    for out, out_torch, out_fp64, name in zip(fused, torch_same, fp64, names):
        atol = ATOL[dtype] * max(1.0, out_fp64.abs().max().item())
        assert_close_to_reference(out, out_torch, out_fp64, atol, name)


def _check_adaln_modulate(device, dtype, shape, index, backend="triton"):
    num_images, num_seq, seq_len, d = shape
    x = torch.randn(num_seq, seq_len, d, dtype=dtype, device=device) * 2 + 0.5
    shift, scale = _vectors(num_images, d, 2, dtype, device)
    image_index = _image_index(index, num_images, num_seq, device)
    dy = torch.randn_like(x)
    inputs = (x, shift, scale)

    fused = _run(lambda *a: adaln_modulate(*a, image_index=image_index, backend=backend), inputs, [dy])
    same = _run(lambda *a: adaln_modulate_ref(*a, image_index=image_index), inputs, [dy])
    fp64 = _run(lambda *a: adaln_modulate_ref(*a, image_index=image_index), [t.double() for t in inputs], [dy])
    names = ["y", "dx", "dshift", "dscale"]
    _compare(fused[0] + fused[1], same[0] + same[1], fp64[0] + fp64[1], dtype, names)
    assert all(g.dtype == dtype for g in fused[1])


def _check_gated(device, dtype, shape, index, use="both", norm=True, backend="triton"):
    num_images, num_seq, seq_len, d = shape
    x = torch.randn(num_seq, seq_len, d, dtype=dtype, device=device) * 2 + 0.5
    y = torch.randn_like(x)
    vecs = _vectors(num_images, d, 3 if norm else 1, dtype, device)  # gate[, shift, scale]
    image_index = _image_index(index, num_images, num_seq, device)
    dx_out = torch.randn_like(x) if use in ("both", "x_out") else None
    dh = torch.randn_like(x) if use in ("both", "h") else None
    upstream = [dx_out, dh] if norm else [dx_out]
    inputs = (x, y, *vecs)

    fused = _run(lambda *a: gated_residual_adaln(*a, image_index=image_index, backend=backend), inputs, upstream)
    same = _run(lambda *a: gated_residual_adaln_ref(*a, image_index=image_index), inputs, upstream)
    fp64 = _run(
        lambda *a: gated_residual_adaln_ref(*a, image_index=image_index), [t.double() for t in inputs], upstream
    )
    names = (["x_out", "h"] if norm else ["x_out"]) + ["dx", "dy", "dgate", "dshift", "dscale"][: len(inputs)]
    _compare(fused[0] + fused[1], same[0] + same[1], fp64[0] + fp64[1], dtype, names)


# --- the Triton kernels (interpreter on the CPU, the GPU where there is one) ------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index", [None, "int64"])
def test_adaln_modulate_triton(device, dtype, shape, index):
    _check_adaln_modulate(device, dtype, shape, index)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index", [None, "int64"])
def test_gated_residual_adaln_triton(device, dtype, shape, index):
    _check_gated(device, dtype, shape, index)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use", ["h", "x_out"])
@pytest.mark.parametrize("index", [None, "int32"])
def test_gated_residual_adaln_one_output_used(device, use, index):
    _check_gated(device, torch.float32, (3, 15, 4, 40), index, use=use)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index", [None, "int64"])
def test_gated_residual_without_norm_triton(device, dtype, index):
    _check_gated(device, dtype, (3, 15, 7, 72), index, norm=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", [None, "int64"])
def test_small_tiles(device, index, monkeypatch):
    """Forward tiles of 2 rows (the compiled path's tile), backward tiles of 1 row, and the partial sums unbounded:
    up to 28 backward programs per image (more than the reduction's 16-program tile) of a few rows each, chunks cut in
    the middle of a sequence."""
    monkeypatch.setattr(adaln, "_TILE_ELEMENTS", 128)
    monkeypatch.setattr(adaln, "_PARTIAL_SHARE", 100.0)
    monkeypatch.setattr(adaln, "_BWD_PROGRAMS", 56)
    monkeypatch.setattr(adaln, "_FWD_VECTOR_BYTES", 4)  # one fp32 per thread: forward tiles of 2 rows of 64 at 4 warps
    monkeypatch.setattr(adaln, "interpreting", lambda: False)
    _check_adaln_modulate(device, torch.float32, (3, 15, 4, 40), index)
    _check_gated(device, torch.float32, (2, 40, 7, 40), index)
    _check_gated(device, torch.float32, (3, 15, 4, 40), index, norm=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["whole images", "split images"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index", [None, "int64"])
def test_backward_paths(device, path, dtype, index, monkeypatch):
    """Both backward grids on odd shapes: one program per image writing dshift/dscale/dgate directly (no partials),
    and several per image with fp32 partials added by the second kernel. The spy proves which one ran."""
    monkeypatch.setattr(adaln, "_PARTIAL_SHARE", 0.0 if path == "whole images" else 10.0)
    chunks = []
    real = adaln._bwd_chunks
    monkeypatch.setattr(adaln, "_bwd_chunks", lambda *a: chunks.append(real(*a)) or chunks[-1])
    _check_adaln_modulate(device, dtype, (5, 15, 3, 72), index)
    _check_gated(device, dtype, (3, 21, 5, 100), index)
    _check_gated(device, dtype, (2, 6, 7, 33), index, norm=False)
    assert len(chunks) == 3
    assert all(c == 1 for c in chunks) if path == "whole images" else all(c > 2 for c in chunks), chunks


@pytest.mark.parametrize("device", DEVICES)
def test_float64_takes_the_reference(device):
    x = torch.randn(6, 4, 40, dtype=torch.float64, device=device)
    shift, scale = _vectors(3, 40, 2, torch.float64, device)
    torch.testing.assert_close(adaln_modulate(x, shift, scale, backend="triton"), adaln_modulate_ref(x, shift, scale))


# --- torch.compile and the custom ops ---------------------------------------------------------------------------------


def _adaln_step(backend):
    def step(x, y, gate, shift, scale, image_index):
        h = adaln_modulate(x, shift, scale, image_index, backend=backend)
        x_out, h2 = gated_residual_adaln(x, h, gate, shift, scale, image_index, backend=backend)
        last = gated_residual_adaln(x_out, h2, gate, image_index=image_index, backend=backend)
        return (last * y).sum()

    return step


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("index", [None, "int64"])
def test_torch_compile_fullgraph(backend, index):
    num_images, num_seq, seq_len, d = 3, 9, 4, 40
    x, y = torch.randn(2, num_seq, seq_len, d)
    vecs = _vectors(num_images, d, 3, torch.float32, "cpu")
    image_index = _image_index(index, num_images, num_seq, "cpu")
    step = _adaln_step(backend)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager = _run(lambda *a: step(*a, image_index), (x, y, *vecs), [torch.tensor(1.0)])
    traced = _run(lambda *a: compiled(*a, image_index), (x, y, *vecs), [torch.tensor(1.0)])
    for a, b in zip(eager[0] + eager[1], traced[0] + traced[1]):
        torch.testing.assert_close(a, b)


def test_opcheck():
    """Schema, fake implementation, autograd registration and AOT dispatch of every custom op (fwd and, through the
    registered autograd, bwd)."""
    x, y = torch.randn(2, 6, 3, 40, requires_grad=True)
    gate, shift, scale = (v.requires_grad_() for v in _vectors(3, 40, 3, torch.float32, "cpu"))
    image_index = torch.tensor([2, 0, 0, 2, 2, 0])
    for index in (None, image_index):
        torch.library.opcheck(torch.ops.lego.adaln_modulate_fwd.default, (x, shift, scale, index, "triton"))
    gated = torch.ops.lego.gated_residual_adaln_fwd.default
    torch.library.opcheck(gated, (x, y, gate, shift, scale, image_index, "triton"))
    torch.library.opcheck(torch.ops.lego.gated_residual_fwd.default, (x, y, gate, None))


# --- dispatch and argument checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cpu_backends_give_the_reference(backend):
    x, y = torch.randn(2, 6, 4, 40)
    gate, shift, scale = _vectors(3, 40, 3, torch.float32, "cpu")
    assert torch.equal(adaln_modulate(x, shift, scale, backend=backend), adaln_modulate_ref(x, shift, scale))
    for got, want in zip(
        gated_residual_adaln(x, y, gate, shift, scale, backend=backend),
        gated_residual_adaln_ref(x, y, gate, shift, scale),
    ):
        assert torch.equal(got, want)
    assert torch.equal(gated_residual_adaln(x, y, gate, backend=backend), gated_residual_adaln_ref(x, y, gate))


def test_bad_arguments():
    x, y = torch.randn(2, 6, 4, 40)
    gate, shift, scale = _vectors(3, 40, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="width 39"):
        adaln_modulate(x, shift[:, :39], scale[:, :39], backend="triton")
    with pytest.raises(ValueError, match="not a multiple of the 4 images"):
        adaln_modulate(x, *_vectors(4, 40, 2, torch.float32, "cpu"), backend="triton")
    with pytest.raises(TypeError, match="image_index must be a torch.Tensor, got list"):
        adaln_modulate(x, shift, scale, [0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="image_index has 5 entries"):
        adaln_modulate(x, shift, scale, torch.zeros(5, dtype=torch.long), backend="triton")
    with pytest.raises(ValueError, match="both shift and scale"):
        gated_residual_adaln(x, y, gate, shift, backend="triton")
    with pytest.raises(ValueError, match="y has shape"):
        gated_residual_adaln(x, y[:, :3], gate, shift, scale, backend="triton")
    for backend in ("torch", "triton"):  # hidden size 0: the Triton launchers divided by it
        with pytest.raises(ValueError, match="x has hidden size 0"):
            adaln_modulate(x[..., :0], shift[:, :0], scale[:, :0], backend=backend)
        with pytest.raises(ValueError, match="x has hidden size 0"):
            gated_residual_adaln(x[..., :0], y[..., :0], gate[:, :0], backend=backend)


def test_missing_backend(monkeypatch):
    x = torch.randn(6, 4, 40)
    shift, scale = _vectors(3, 40, 2, torch.float32, "cpu")
    if "cuda" not in available_backends(x.device):
        with pytest.raises(ValueError, match="backend 'cuda' is not available"):
            adaln_modulate(x, shift, scale, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' is not available"):
        adaln_modulate(x, shift, scale, backend="triton")
    with pytest.raises(ValueError, match="backend 'triton' is not available"):
        gated_residual_adaln(x, x, shift, backend="triton")


# --- compile-only: each kernel variant builds for sm_80 and sm_90 -----------------------------------------------------


def _fwd_signature(dt):
    ptrs = {n: f"*{dt}" for n in ("X", "Y", "GATE", "SHIFT", "SCALE")}
    ptrs |= {"IMAGE_INDEX": "*i64", "X_OUT": f"*{dt}", "H": f"*{dt}", "MEAN": "*fp32", "RSTD": "*fp32"}
    ints = {n: "i32" for n in ("num_rows", "d", "seq_len", "seqs_per_image", "stride_row", "stride_vec")}
    return ptrs | ints | {"eps": "fp32"}


def _bwd_signature(dt, sums):
    ptrs = {n: f"*{dt}" for n in ("DH", "DX_OUT", "X", "Y", "GATE", "SCALE")} | {"MEAN": "*fp32", "RSTD": "*fp32"}
    ptrs |= {n: "*i64" for n in ("ORDER", "SEQ_START", "SEQ_COUNT")}
    ptrs |= {"DX": f"*{dt}", "DY": f"*{dt}"} | {n: f"*{sums}" for n in ("SUM0", "SUM1", "SUM2")}
    ints = ["d", "seq_len", "seqs_per_image", "chunks_per_image", "stride_row", "stride_vec", "stride_sum"]
    return ptrs | {n: "i32" for n in ints}


# (dtype, HAS_RESIDUAL, HAS_NORM, HAS_INDEX, BLOCK_R, BLOCK_D): adaln_modulate at d = 1152, the fused gated residual
# at d = 384 with an image_index, the gated residual alone at a small width.
VARIANTS = [
    ("bf16", False, True, False, 2, 2048),
    ("fp16", True, True, True, 8, 512),
    ("fp32", True, False, False, 64, 64),
]


def _variant_specs(variant):
    """(kernel, signature, constexprs) of the forward, backward and partial-reduction kernels of one variant."""
    dt, residual, norm, index, block_r, block_d = variant
    flags = {"HAS_RESIDUAL": residual, "HAS_NORM": norm, "HAS_INDEX": index, "BLOCK_R": block_r, "BLOCK_D": block_d}
    reduce_flags = {"BLOCK_P": 16, "BLOCK_D": min(block_d, 256)}
    reduce_signature = {"PARTIAL": "*fp32"} | {n: f"*{dt}" for n in ("OUT0", "OUT1", "OUT2")}
    reduce_signature |= {n: "i32" for n in ("d", "chunks_per_image", "stride_partial_kind", "stride_partial_program")}
    reduce_signature |= {"stride_out": "i32"} | dict.fromkeys(reduce_flags, "constexpr")
    return [
        (adaln._adaln_fwd_kernel, _fwd_signature(dt) | dict.fromkeys(flags, "constexpr"), flags),
        # The backward writes the sums themselves (one program per image) or fp32 partials (several).
        (adaln._adaln_bwd_kernel, _bwd_signature(dt, dt) | dict.fromkeys(flags, "constexpr"), flags),
        (adaln._adaln_bwd_kernel, _bwd_signature(dt, "fp32") | dict.fromkeys(flags, "constexpr"), flags),
        (adaln._reduce_partials_kernel, reduce_signature, reduce_flags),
    ]


def test_compiles_for_gpu():
    """Every kernel variant builds for sm_80 and sm_90 (all of them in one child process)."""
    pytest.importorskip("triton")
    compile_for_gpu(*[spec for variant in VARIANTS for spec in _variant_specs(variant)], capabilities=(80, 90))


# --- GPU: bf16, the model's shapes, the CUDA extension, determinism ---------------------------------------------------


def _gpu_backends():
    return [b for b in ("triton", "cuda") if b in available_backends("cuda")] if torch.cuda.is_available() else []


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + MODEL_SHAPES)
@pytest.mark.parametrize("index", [None, "int64"])
def test_gpu(dtype, shape, index):
    for backend in _gpu_backends():
        _check_adaln_modulate("cuda", dtype, shape, index, backend=backend)
        _check_gated("cuda", dtype, shape, index, backend=backend)
    _check_gated("cuda", dtype, shape, index, norm=False)


@pytest.mark.cuda
@pytest.mark.parametrize("index", [None, "int64"])
def test_gpu_backward_is_deterministic(index):
    num_images, num_seq, seq_len, d = MODEL_SHAPES[0]
    x, y = torch.randn(2, num_seq, seq_len, d, device="cuda", dtype=torch.bfloat16)
    vecs = _vectors(num_images, d, 3, torch.bfloat16, "cuda")
    image_index = _image_index(index, num_images, num_seq, "cuda")
    upstream = [torch.randn_like(x), torch.randn_like(x)]
    for backend in _gpu_backends():

        def fn(*a, backend=backend):
            return gated_residual_adaln(*a, image_index=image_index, backend=backend)

        first, second = _run(fn, (x, y, *vecs), upstream), _run(fn, (x, y, *vecs), upstream)
        for a, b in zip(first[1], second[1]):
            assert torch.equal(a, b), backend


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` records the grid and launches nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append(grid)


# (images, rows per image, d, gated) -> (backward programs, partials added up by a second kernel) at the model's bricks
# (XL: the 16 x 16 brick of U-32, 16 rows per image; the S = 1 and S = 4 patch-bricks of PG-32, 64; the image brick,
# 256; LEGO-S's 64 x 64 image brick, 1024 rows at d 384), worked out by hand from the rule in adaln.py.
MODEL_GRIDS = {
    (64, 16, 1152, False): (64, False),  # 1 per image: a 2nd would cost 2 x 64 x 2 x 9216 B = 2.4 MB > 0.77 MB
    (64, 16, 1152, True): (64, False),
    (256, 16, 1152, True): (256, False),
    (64, 64, 1152, False): (128, True),  # 0.1 x 28.9 MB of partials: 2 per image
    (64, 64, 1152, True): (192, True),  # 0.1 x 57.4 MB: 3 per image
    (64, 256, 1152, False): (576, True),  # 0.1 x 114 MB: 9 per image (under two waves: the bytes bound first)
    (64, 256, 1152, True): (768, True),  # 12 per image
    (256, 256, 1152, True): (1280, True),  # cdiv(1056, 256) = 5 per image: two waves of 4 programs per SM
    (16, 1024, 384, True): (816, True),  # 0.1 x 75.7 MB: 51 per image
    (64, 1024, 384, False): (1088, True),  # 17 per image
}


@pytest.mark.parametrize("case", list(MODEL_GRIDS), ids=str)
def test_backward_grid_at_the_model_shapes(case, monkeypatch):
    """The Triton backward's grid on a GPU (bf16, the launcher on meta tensors): the most programs whose fp32 partial
    sums stay within 0.1x the op's minimum bytes, up to two waves; one program per image and no second kernel where a
    second program per image would already cost more."""
    images, rows, d, gated = case
    monkeypatch.setattr(adaln, "interpreting", lambda: False)
    bwd, reduce = _Recorder(), _Recorder()
    monkeypatch.setattr(adaln, "_adaln_bwd_kernel", bwd)
    monkeypatch.setattr(adaln, "_reduce_partials_kernel", reduce)
    with torch.device("meta"):
        x, dx_out, dh, y = torch.empty(4, images * rows, 1, d, dtype=torch.bfloat16)
        gate, shift, scale = torch.empty(3, images, d, dtype=torch.bfloat16)
        mean, rstd = torch.empty(2, images * rows)
    if gated:
        outs = adaln.gated_residual_adaln_bwd(dx_out, dh, x, y, gate, scale, None, mean, rstd)
        inputs, kinds = (dx_out, dh, x, y, gate, scale, mean, rstd), 3
    else:
        outs = adaln.adaln_modulate_bwd(dh, x, shift, scale, None, mean, rstd)
        inputs, kinds = (dh, x, shift, scale, mean, rstd), 2
    ((programs,),) = bwd.grids
    assert (programs, bool(reduce.grids)) == MODEL_GRIDS[case]
    min_bytes = sum(t.numel() * t.element_size() for t in (*inputs, *outs))
    partials = 2 * kinds * d * 4 * programs if reduce.grids else 0
    assert partials <= 0.1 * min_bytes
    one_more = 2 * kinds * d * 4 * (programs + images)  # one more program per image
    assert programs >= 1056 or one_more > 0.1 * min_bytes


@pytest.mark.parametrize("element_size", [2, 4])
def test_forward_tile_is_one_vector_per_thread(element_size, monkeypatch):
    """The compiled forward's tile at the models' widths: one 16-byte vector per thread and tensor, at 4 to 16 warps,
    so that ptxas issues every load before the first store (one round trip under Triton 3.6 and 3.9, gated by
    tests/test_static_profile.py); at d >= 384 at most 2 rows per program, so the grid has a program per 1 or 2 rows
    (LEGO-S's 16 x 16 brick at B 64 once ran 512 programs of 8 rows, under one wave)."""
    monkeypatch.setattr(adaln, "interpreting", lambda: False)
    per_thread = 16 // element_size
    for d in (128, 384, 1024, 1152):
        block_d, block_r, num_warps = adaln._tile(d, 4096, element_size=element_size)
        assert num_warps in (4, 8, 16) and block_r * block_d == num_warps * 32 * per_thread, (d, block_r, num_warps)
        assert block_r <= 2 or d < 384
    assert adaln._tile(1024, 1, element_size=2)[1] == 1  # never more rows than there are


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    """No images and no sequences: empty outputs and gradients on every backend, not a division by zero."""
    x, y = (torch.randn(0, 4, 40, requires_grad=True) for _ in range(2))
    gate, shift, scale = (torch.randn(0, 40, requires_grad=True) for _ in range(3))
    h = adaln_modulate(x, shift, scale, backend=backend)
    x_out, h2 = gated_residual_adaln(x, y, gate, shift, scale, backend=backend)
    last = gated_residual_adaln(x_out, h2, gate, backend=backend)
    assert h.shape == x_out.shape == last.shape == (0, 4, 40)
    (h.sum() + last.sum()).backward()
    assert x.grad.shape == x.shape and gate.grad.shape == scale.grad.shape == (0, 40)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_image_index_out_of_range(backend):
    """An image id outside 0..B-1 is refused on every backend with one line naming it (the Triton kernels read past
    the per-image vectors and never wrote that sequence's dx; the reference wrapped -1 to the last image)."""
    x, y = torch.randn(2, 6, 4, 40)
    gate, shift, scale = _vectors(2, 40, 3, torch.float32, "cpu")
    for bad in (2, -1):
        image_index = torch.tensor([0, 1, bad, 0, 1, 1])
        with pytest.raises(ValueError, match=f"image_index holds {bad}, outside 0..1"):
            adaln_modulate(x, shift, scale, image_index, backend=backend)
        with pytest.raises(ValueError, match=f"image_index holds {bad}, outside 0..1"):
            gated_residual_adaln(x, y, gate, shift, scale, image_index, backend=backend)
        with pytest.raises(ValueError, match=f"image_index holds {bad}, outside 0..1"):
            gated_residual_adaln(x, y, gate, image_index=image_index, backend=backend)


def test_meta_tensors_with_image_index():
    """Shape-only runs on the meta device keep working with an image_index (its values are checked where they exist)."""
    with torch.device("meta"):
        x, y = torch.empty(2, 6, 4, 40)
        gate, shift, scale = torch.empty(3, 2, 40)
        image_index = torch.zeros(6, dtype=torch.long)
    assert adaln_modulate(x, shift, scale, image_index).shape == x.shape
    assert gated_residual_adaln(x, y, gate, shift, scale, image_index)[1].shape == x.shape
