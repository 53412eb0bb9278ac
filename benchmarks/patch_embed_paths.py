"""The patch_embed backward, path by path: what bench_patch_embed_bwd.py times, and the analysis report.py prints.

lego_kernels/patch_embed.py's backward (``_patch_embed_bwd_triton``) picks between three paths:

    fused       ``_patch_embed_bwd_fused`` (with input gradients): one kernel reads dtok once for dx/dprev and sums
                dweight across token tiles with fp32
                atomics in L2 (programs x d x K x 4 B of atomic traffic) into an fp32 accumulator (8 d K DRAM bytes:
                zeroed, then read for the cast). Its token tile (``_bwd_config``) takes the fewest of ``_BWD_ROWS`` =
                32/64/128 rows whose atomic traffic stays within ``_ATOMIC_SHARE`` x the bytes of dtok it reads.
    two-pass    ``_patch_embed_bwd_two_pass``: dweight/dpos from fixed-order fp32 partials, then dx/dprev: dtok is read
                twice. The library takes it, with ``weight_programs=1`` (dweight in one piece, no fp32 buffer), where
                tokens < ``_TWO_PASS_TOKENS_PER_K`` x K.
    weight-only ``_patch_embed_bwd_weight_only``: where no input needs a gradient (a bottom brick), the first of the two
                kernels alone over about ``_BWD_ATOMIC_PROGRAMS`` programs, its splits summed with fp32 atomics.

Which side wins, and at which tile, is a GPU measurement; the rows here are that measurement (PATHS, one row each):
the fused kernel as configured, with its tile forced to 32, 64 and 128 rows (``_BWD_ROWS`` patched for the duration
of the row, never in the library), the two-kernel path with its default split and with ``weight_programs=1``, and
where no input needs a gradient the weight kernel alone instead of the fused ones (``paths_for``). A path whose
launches (kernels, grids, constexprs) equal an earlier path's at a shape is not a row there (``distinct_paths``).
``plan`` finds the launches without running them: the path runs on ``meta`` tensors with its kernels replaced by
recorders.

``analyze`` turns the rows (and the L2 atomic probe's, benchmarks/l2_atomics.py) into: the fastest path per shape and
batch, the L2-atomic / DRAM cost ratio, the values of ``_ATOMIC_SHARE`` and ``_TWO_PASS_TOKENS_PER_K`` that the
measured times favour (replayed through the library's own tile choice), and how the static profile's waves/bytes rule
for atomic kernels follows from the ratio. Without GPU rows every figure is "not measured".
"""

from __future__ import annotations

import contextlib
import importlib
import math
from unittest import mock

import torch

from benchmarks import counts

PATHS = ("fused", "fused-rows32", "fused-rows64", "fused-rows128", "two-pass", "two-pass-1", "weight-only")
FORCED_ROWS = {"fused-rows32": 32, "fused-rows64": 64, "fused-rows128": 128}
KIND = "patch_embed_bwd"  # record kinds of the rows (report.py)
PROBE_KIND = "l2_probe"
CONTENDED = "same-order"  # the probe pattern of the fused kernel (every program adds the same addresses in order)
SHARE_GRID = tuple(2.0**e for e in range(-3, 7))  # _ATOMIC_SHARE values the replay tries: 1/8 .. 64
NOT_MEASURED = "not measured"


def module():
    """lego_kernels.patch_embed, the file (the package's attribute of that name is the public function)."""
    return importlib.import_module("lego_kernels.patch_embed")


def make_inputs(s: counts.OpShape, dev: torch.device) -> tuple:
    """Fixed backward inputs of one brick shape: (dtok [N, S, d], x, prev or None, weight [d, C', l, l], brick, field,
    input_grad). A brick with prev needs dprev (input_grad); a bottom brick's inputs need no gradient."""

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=torch.float32).mul_(scale).to(s.dtype)

    dtok = randn(s.num_seq, s.seq_len, s.hidden)
    x = randn(s.batch, s.channels, s.height, s.width)
    prev = randn(s.batch, s.channels, s.height, s.width) if s.has_prev else None
    weight = randn(s.hidden, s.embed_in, s.field, s.field, scale=0.1)
    return dtok, x, prev, weight, s.brick, s.field, s.has_prev


def forced_rows(rows: int | None):
    """The fused kernel's token tile forced to ``rows`` rows (``_BWD_ROWS`` = (rows,)) inside the block; None: as
    configured. Restored on exit."""
    pe = module()
    if rows is None:
        return contextlib.nullcontext()
    if not hasattr(pe, "_BWD_ROWS"):
        raise LookupError("lego_kernels.patch_embed has no _BWD_ROWS: the fused backward's tile cannot be forced")
    return mock.patch.object(pe, "_BWD_ROWS", (rows,))


def atomic_share(value: float):
    """``_ATOMIC_SHARE`` set to ``value`` inside the block (the analysis replays the tile choice with it)."""
    return mock.patch.object(module(), "_ATOMIC_SHARE", value)


def path_fn(path: str):
    """The backward entry point of a path, called as fn(dtok, x, prev, weight, None, brick, field, input_grad)."""
    pe = module()
    if path == "auto":
        return pe._patch_embed_bwd_triton
    if path == "fused" or path in FORCED_ROWS:  # always computes dx: its signature has no input_grad
        return lambda *args: pe._patch_embed_bwd_fused(*args[:-1])
    if path == "two-pass":
        return pe._patch_embed_bwd_two_pass
    if path == "two-pass-1":
        return lambda *args: pe._patch_embed_bwd_two_pass(*args, weight_programs=1)
    if path == "weight-only":  # no input gradients: its signature has no input_grad
        return lambda *args: pe._patch_embed_bwd_weight_only(*args[:-1])
    raise ValueError(f"unknown path {path!r}; choose one of auto, {', '.join(PATHS)}")


def call(path: str, inputs: tuple):
    dtok, x, prev, weight, brick, field, input_grad = inputs
    return path_fn(path)(dtok, x, prev, weight, None, brick, field, input_grad)


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the launch and runs nothing."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args)) | kwargs
            g = tuple(grid(named) if callable(grid) else grid)
            g = g + (1,) * (3 - len(g))
            constexprs = {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}
            atomic = getattr(self.kernel, "atomic_bytes", None)
            self.launches.append({
                "kernel": self.name, "grid": list(g), "programs": math.prod(g), "constexprs": constexprs,
                "atomic_bytes": sum(atomic(g, named).values()) if atomic else 0,
            })  # fmt: skip

        return record


def plan(path: str, inputs: tuple, rows: int | None = None) -> list[dict]:
    """The launches a path makes (kernel, grid, programs, constexprs, declared L2 atomic bytes), found by running it on
    meta tensors with every ``_patch_embed_bwd*`` kernel replaced by a recorder: no compile, no GPU."""
    pe = module()
    launches: list[dict] = []
    kernels = {n: k for n, k in vars(pe).items() if n.startswith("_patch_embed_bwd") and hasattr(k, "arg_names")}
    meta = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)
    with contextlib.ExitStack() as stack:
        for name, kernel in kernels.items():
            stack.enter_context(mock.patch.object(pe, name, _Recorder(name.lstrip("_"), kernel, launches)))
        stack.enter_context(forced_rows(rows if rows is not None else FORCED_ROWS.get(path)))
        call(path, meta)
    return launches


def same_launches(a: list[dict], b: list[dict]) -> bool:
    key = [(x["kernel"], x["grid"], sorted(x["constexprs"].items())) for x in a]
    return key == [(x["kernel"], x["grid"], sorted(x["constexprs"].items())) for x in b]


def row_fields(s: counts.OpShape, shape_name: str, path: str) -> dict:
    """A row's record, less its timing: the launches of its path, the fused tile, what the library picks at this shape
    (``_patch_embed_bwd_triton``), the later paths it duplicates, and the backward's FLOPs and minimum bytes."""
    inputs = make_inputs(s, torch.device("meta"))
    applicable = paths_for(s)
    plans = {p: plan(p, inputs) for p in ("auto", *applicable)}
    picks = next((p for p in ("fused", "two-pass-1", "two-pass", "weight-only") if p in applicable
                  and same_launches(plans["auto"], plans[p])), "other")  # fmt: skip
    later = applicable[applicable.index(path) + 1 :]
    cost = counts.patch_embed_cost(s, backward=True)
    return {
        "kind": KIND, "op": "patch_embed", "mode": "bwd", "path": path, "backend": "triton", "shape_name": shape_name,
        "batch": s.batch, "shape": s.as_dict(), "tokens": s.tokens, "K": s.embed_in * s.field**2,
        "library_picks": picks, "same_as": [p for p in later if same_launches(plans[p], plans[path])],
        "launches": plans[path], "tile": tile(plans[path]), "flops": cost.flops, "bytes": cost.bytes, "sweep": False,
    }  # fmt: skip


def paths_for(s: counts.OpShape) -> tuple[str, ...]:
    """The PATHS that compute what the backward at shape ``s`` needs: with input gradients (a brick with prev) all
    but weight-only, which computes none; without, the two-kernel paths and weight-only (the fused kernel always
    computes dx)."""
    if s.has_prev:
        return tuple(p for p in PATHS if p != "weight-only")
    return tuple(p for p in PATHS if p.startswith(("two-pass", "weight-only")))


def distinct_paths(s: counts.OpShape) -> tuple[str, ...]:
    """The paths_for ``s`` whose launches differ from every earlier path's (all of them without triton)."""
    from lego_kernels._dispatch import triton_importable

    paths = paths_for(s)
    if not triton_importable():
        return paths
    inputs = make_inputs(s, torch.device("meta"))
    plans = {p: plan(p, inputs) for p in paths}
    return tuple(p for i, p in enumerate(paths) if not any(same_launches(plans[q], plans[p]) for q in paths[:i]))


def tile(launches: list[dict]) -> dict | None:
    """The fused kernel's tile in a plan: BLOCK_P x BLOCK_S rows, its programs and L2 atomic bytes; None if absent."""
    for x in launches:
        if "BLOCK_P" in x["constexprs"] and "BLOCK_S" in x["constexprs"]:
            c = x["constexprs"]
            return {"rows": c["BLOCK_P"] * c["BLOCK_S"], "block_p": c["BLOCK_P"], "block_s": c["BLOCK_S"],
                    "programs": x["programs"], "atomic_bytes": x["atomic_bytes"]}  # fmt: skip
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Analysis (report.py): from the rows of one run


def _us(r: dict | None) -> float | None:
    return None if r is None else r["timing"]["median_ms"] * 1e3


def analyze(records: list[dict], peaks: dict | None, measured: bool) -> dict:
    """Fastest path per shape, the L2-atomic / DRAM ratio, the constants the rows favour and the static rule.
    ``measured``: the rows ran on a GPU (else every figure is "not measured": CPU timings are not results)."""
    rows = [r for r in records if r.get("kind") == KIND]
    probes = [r for r in records if r.get("kind") == PROBE_KIND]
    out: dict = {"measured": bool(measured and (rows or probes)), "rows": len(rows), "probe_rows": len(probes)}
    out["probe"] = _probe(probes, peaks, out["measured"])
    shapes = []
    for key in dict.fromkeys((r["shape_name"], r["batch"]) for r in rows):
        same = [r for r in rows if (r["shape_name"], r["batch"]) == key]
        first = same[0]
        entry = {
            "shape": key[0], "batch": key[1], "tokens": first["tokens"], "K": first["K"],
            "library_picks": first["library_picks"], "min_bytes": first["bytes"], "d": first["shape"]["hidden"],
            "paths": [{"path": r["path"], "same_as": r.get("same_as", []), "tile": r.get("tile"),
                       "programs": sum(x["programs"] for x in r["launches"]),
                       "atomic_bytes": sum(x["atomic_bytes"] for x in r["launches"]),
                       "median_us": _us(r) if out["measured"] else None,
                       "hbm_share": r.get("hbm_share") if out["measured"] else None} for r in same],
        }  # fmt: skip
        timed = [p for p in entry["paths"] if p["median_us"] is not None]
        entry["fastest"] = min(timed, key=lambda p: p["median_us"])["path"] if timed else None
        shapes.append(entry)
    out["shapes"] = shapes
    out["atomic_share"] = _best_atomic_share(rows, out["measured"])
    out["two_pass_tokens_per_k"] = _best_tokens_per_k(shapes, out["measured"])
    out["static_rule"] = _static_rule(shapes, out["probe"])
    return out


def _probe(probes: list[dict], peaks: dict | None, measured: bool) -> dict:
    table = [{"pattern": r["pattern"], "op": r["op"], "buffer_mb": r["buffer_bytes"] / 2**20,
              "gbps": r.get("gbps") if measured else None, "dram_share": r.get("hbm_share") if measured else None}
             for r in probes]  # fmt: skip
    atomic = next((t for t in table if t["op"] == "atomic" and t["pattern"] == CONTENDED), None)
    ratio = atomic["dram_share"] if atomic and measured and peaks else None
    return {"table": table, "dram_gbps": peaks.get("hbm_gbps") if measured and peaks else None,
            "atomic_to_dram": ratio,  # L2 atomic bytes/s over DRAM copy bytes/s
            "atomic_cost": 1 / ratio if ratio else None}  # DRAM-byte equivalents of one atomic byte  # fmt: skip


def _best_atomic_share(rows: list[dict], measured: bool) -> dict:
    """Replays the library's tile choice (``_bwd_config`` via ``plan``) at each power-of-two ``_ATOMIC_SHARE`` on the
    measured shapes, and keeps the values whose chosen tiles sum to the least measured time."""
    pe = module()
    current = getattr(pe, "_ATOMIC_SHARE", None)
    result = {"current": current, "best": None, "tied": [], "total_us": {}, "note": NOT_MEASURED}
    if not measured:
        return result
    # Only the shapes where the library runs the fused kernel: elsewhere _ATOMIC_SHARE decides nothing.
    fused = [r for r in rows if (r["path"] == "fused" or r["path"] in FORCED_ROWS) and r["library_picks"] == "fused"]
    keys = list(dict.fromkeys((r["shape_name"], r["batch"]) for r in fused))
    if not keys:
        return result | {"note": "no fused rows in this run"}
    totals = {}
    for share in sorted({*SHARE_GRID, current}):
        total = 0.0
        for key in keys:
            same = [r for r in fused if (r["shape_name"], r["batch"]) == key]
            with atomic_share(share):
                chosen = tile(plan("fused", _meta_inputs(same[0])))
            hit = next((r for r in same if r.get("tile") and chosen and r["tile"]["block_p"] == chosen["block_p"]
                        and r["tile"]["block_s"] == chosen["block_s"]), None)  # fmt: skip
            if hit is None:  # the share picks a tile no row measured: it cannot be scored
                total = None
                break
            total += _us(hit)
        if total is not None:
            totals[share] = total
    if not totals:
        return result | {"note": "no share value picks only measured tiles"}
    least = min(totals.values())
    tied = sorted(s for s, t in totals.items() if math.isclose(t, least, rel_tol=1e-9))  # the same tiles everywhere
    best = current if current in tied else tied[0]
    return result | {"best": best, "tied": tied, "total_us": {str(k): v for k, v in totals.items()}, "note": ""}


def _meta_inputs(r: dict) -> tuple:
    s = r["shape"]
    shape = counts.OpShape(s["batch"], s["channels"], s["height"], s["width"], s["brick"], s["field"], s["hidden"],
                           s["heads"], getattr(torch, s["dtype"]), s["has_prev"])  # fmt: skip
    return make_inputs(shape, torch.device("meta"))


def _best_tokens_per_k(shapes: list[dict], measured: bool) -> dict:
    """The threshold c of ``tokens < c K -> two kernels, dweight in one piece``: the interval of c whose choices sum to
    the least measured time (fused at the configured tile against two-pass-1; a shape without a two-pass-1 row uses
    the two-pass row it duplicates)."""
    pe = module()
    current = getattr(pe, "_TWO_PASS_TOKENS_PER_K", None)
    result = {"current": current, "interval": None, "best": None, "note": NOT_MEASURED}
    if not measured:
        return result
    points = []  # (tokens / K, fused us, two-pass-1 us)
    for e in shapes:  # a brick without input gradients has no fused row: it decides nothing here
        by = {p["path"]: p for p in e["paths"]}
        fused = next((p for p in e["paths"] if p["path"] == "fused"), None)
        two = by.get("two-pass-1") or next((p for p in e["paths"] if "two-pass-1" in p["same_as"]), None)
        if fused and two and fused["median_us"] is not None and two["median_us"] is not None:
            points.append((e["tokens"] / e["K"], fused["median_us"], two["median_us"]))
    if not points:
        return result | {"note": "no shape has both a fused and a two-pass-1 row"}
    cuts = sorted({q for q, _, _ in points})
    bounds = [0.0, *cuts]  # c in (bounds[j], next]: the shapes with q < c go two-pass
    best_j, best_total = 0, None
    for j in range(len(bounds)):
        c = bounds[j] + 1e-9 if j else 0.0
        total = sum(two if q < c else fused for q, fused, two in points)
        if best_total is None or total < best_total - 1e-9:
            best_j, best_total = j, total
    lo = bounds[best_j]
    hi = cuts[best_j] if best_j < len(cuts) else math.inf
    # Shapes with q < c go two-pass: c must exceed every q that does (lo) and not exceed the first that stays fused
    # (hi). Keep the current value where it already lies there; else the smallest whole number, else the middle.
    if current is not None and (lo < current or best_j == 0) and current <= hi:
        best = current
    elif best_j == 0:
        best = 0  # no shape is faster on two kernels: never take them
    else:
        whole = math.floor(lo) + 1
        best = whole if whole <= hi else round((lo + hi) / 2, 3)
    return result | {"interval": [lo, hi], "best": best, "total_us": best_total, "note": ""}


def _static_rule(shapes: list[dict], probe: dict) -> dict:
    """The static profile's rule for an atomic kernel, from the measured ratio r = L2 atomic bytes/s over DRAM bytes/s,
    under the two models of what atomic traffic costs, and which one the fused rows' times fit:

        additive   the atomics' time adds to the DRAM time: an atomic byte is 1/r DRAM bytes, charged in the bytes
                   check, so the programs an atomic kernel may run are those whose atomic traffic stays within
                   (MAX_BYTES_RATIO - 1) x the op's minimum bytes: programs <= 0.1 x minimum / (atomic bytes per
                   program / r)
        overlap    the atomics run in L2 beside the DRAM traffic: free while their time stays within the DRAM time,
                   programs <= r x minimum / atomic bytes per program (the rule _ATOMIC_SHARE = r states per tile)

    A fused row's DRAM bytes: the backward's minimum plus its fp32 accumulator (zeroed, read back: 8 d K). Both models
    leave out latency (grids under a wave), so the fit says which is closer, not that either is exact."""
    from benchmarks.static import MAX_BYTES_RATIO

    ratio, dram = probe.get("atomic_to_dram"), probe.get("dram_gbps")
    slack = MAX_BYTES_RATIO - 1
    per_shape, errors = [], {"additive": [], "overlap": []}
    for e in shapes:
        fused = next((p for p in e["paths"] if p["path"] == "fused"), None)
        if not fused or not fused["atomic_bytes"]:
            continue
        per_program = fused["atomic_bytes"] / fused["programs"]
        per_shape.append({
            "shape": e["shape"], "batch": e["batch"], "programs": fused["programs"],
            "atomic_bytes_per_program": per_program,
            "allowed_additive": int(slack * e["min_bytes"] * ratio / per_program) if ratio else None,
            "allowed_overlap": int(ratio * e["min_bytes"] / per_program) if ratio else None,
        })  # fmt: skip
        if not (ratio and dram):
            continue
        accumulator = 8 * e["d"] * e["K"]
        for q in e["paths"]:
            if q["tile"] and q["median_us"]:
                t_dram = (e["min_bytes"] + accumulator) / (dram * 1e3)  # us
                t_atomic = q["atomic_bytes"] / (ratio * dram * 1e3)
                errors["additive"].append(abs(math.log(q["median_us"] / (t_dram + t_atomic))))
                errors["overlap"].append(abs(math.log(q["median_us"] / max(t_dram, t_atomic))))
    fit = {k: sum(v) / len(v) for k, v in errors.items() if v}  # mean |log(measured / predicted)|
    return {"ratio": ratio, "shapes": per_shape, "fit": fit, "closer": min(fit, key=fit.get) if fit else None,
            "slack": slack}  # fmt: skip


def summary(res: dict | None) -> list[str]:
    """The lines a later session acts on (report.py prints them)."""
    if not res or not (res["rows"] or res["probe_rows"]):
        return []
    if not res["measured"]:
        return [("patch_embed backward trade-offs: not measured (no GPU rows): _ATOMIC_SHARE, _TWO_PASS_TOKENS_PER_K "
                "and the L2-atomic / DRAM ratio stay open")]  # fmt: skip
    p, share, tpk = res["probe"], res["atomic_share"], res["two_pass_tokens_per_k"]
    ratio = NOT_MEASURED if p["atomic_to_dram"] is None else f"{p['atomic_to_dram']:.3f}"
    return [
        (
            f"patch_embed backward: L2 atomic ({CONTENDED}) / DRAM copy bandwidth = {ratio}; atomic cost model closer "
            f"to the fused rows: {res['static_rule']['closer'] or NOT_MEASURED}"
        ),
        f"patch_embed backward: _ATOMIC_SHARE (now {share['current']}): " + _verdict(share, f"tied: {share['tied']}"),
        f"patch_embed backward: _TWO_PASS_TOKENS_PER_K (now {tpk['current']}): "
        + _verdict(tpk, f"any c with {_interval(tpk['interval'])}"),
    ]


def _verdict(x: dict, why: str) -> str:
    return f"set {x['best']} ({why})" if x["best"] is not None else f"not derived ({x['note']})"


def markdown(res: dict | None) -> list[str]:
    from benchmarks.report import _pct, _table  # the report's table format (report.py imports this module)

    if not res or not (res["rows"] or res["probe_rows"]):
        return []
    lines = ["## patch_embed backward: paths, tiles and L2 atomics", "",
             ("The backward alone (fixed dtok, x, prev, weight) on each path of lego_kernels/patch_embed.py: `fused` "
             "as configured, `fused-rowsN` with its token tile forced to N rows, `two-pass` (dtok read twice, fp32 "
             "partials), `two-pass-1` (weight_programs=1: dweight in one piece) and, where no input needs a gradient, "
             "`weight-only` (the weight kernel alone, fp32 atomics). A path with the same launches as "
             "another at that shape is not a row (`=` names them). GB/s and HBM: the backward's minimum bytes over the "
             "time. benchmarks/patch_embed_paths.py says what each figure decides."), ""]  # fmt: skip
    if not res["measured"]:
        lines += [("**Not measured**: no GPU rows in this run (CPU timings are not results). Every figure below is "
                  "not measured."), ""]  # fmt: skip
    p = res["probe"]
    lines += [(f"L2 atomic probe (benchmarks/l2_atomics.py), against the measured DRAM copy bandwidth "
              f"({_fmt(p['dram_gbps'], '.0f')} GB/s):"), ""]  # fmt: skip
    lines += _table(["pattern", "op", "buffer MB", "GB/s", "share of DRAM copy"],
                    [[t["pattern"], t["op"], f"{t['buffer_mb']:.3g}", _fmt(t["gbps"], ".0f"), _pct(t["dram_share"])]
                     for t in p["table"]])  # fmt: skip
    lines += [(f"- L2 atomic ({CONTENDED}) / DRAM bandwidth: {_fmt(p['atomic_to_dram'], '.3f')}; one atomic byte costs "
              f"{_fmt(p['atomic_cost'], '.3g')} DRAM bytes"), ""]  # fmt: skip
    rows = []
    for e in res["shapes"]:
        for q in e["paths"]:
            t = q["tile"]
            rows.append([e["shape"], e["batch"], e["tokens"], e["K"], e["library_picks"],
                         q["path"] + (f" (= {', '.join(q['same_as'])})" if q["same_as"] else ""),
                         f"{t['block_p']} x {t['block_s']}" if t else "–", q["programs"],
                         f"{q['atomic_bytes'] / 1e6:.1f}", _fmt(q["median_us"], ".1f"), _pct(q["hbm_share"]),
                         "**fastest**" if q["path"] == e["fastest"] else ""])  # fmt: skip
    lines += _table(["brick", "batch", "tokens", "K", "library picks", "path", "tile P x S", "programs",
                     "atomic MB", "median us", "HBM", ""], rows)  # fmt: skip
    share, tpk, rule = res["atomic_share"], res["two_pass_tokens_per_k"], res["static_rule"]
    lines += [
        f"- `_ATOMIC_SHARE` (now {share['current']}): {_fmt(share['best'])}"
        + (
            f" (least summed time over the measured shapes, replaying `_bwd_config` at 1/8 .. 64; tied: "
            f"{share['tied']})"
            if share["best"] is not None
            else _note(share)
        ),
        f"- `_TWO_PASS_TOKENS_PER_K` (now {tpk['current']}): {_fmt(tpk['best'])}"
        + (
            f" (any c with {_interval(tpk['interval'])} gives the least summed time of fused against two-pass-1)"
            if tpk["best"] is not None
            else _note(tpk)
        ),
        "- Static profile rule for atomic kernels (benchmarks/static.py), r = the ratio above: *additive* (atomic time "
        f"adds to DRAM time): charge an atomic byte as 1/r DRAM bytes in the bytes check, so programs <= "
        f"{rule['slack']:g} x minimum bytes x r / atomic bytes per program; *overlap* (atomics run in L2 beside the "
        "DRAM traffic): programs <= r x minimum bytes / atomic bytes per program, which `_ATOMIC_SHARE = r` states per "
        "tile. Either way the waves check would ask an atomic kernel for min(two waves, those programs) (today it asks "
        "two waves). The fused rows fit "
        + (
            ", ".join(f"{k} {v:.2f}" for k, v in rule["fit"].items()) + f" (mean |log(measured / model)|): "
            f"**{rule['closer']}** is closer"
            if rule["closer"]
            else NOT_MEASURED
        )
        + ".",
        "",
    ]
    if rule["shapes"]:
        lines += _table(["brick", "batch", "fused programs", "atomic KB per program", "allowed (additive)",
                         "allowed (overlap)"],
                        [[x["shape"], x["batch"], x["programs"], f"{x['atomic_bytes_per_program'] / 1e3:.1f}",
                          _fmt(x["allowed_additive"]), _fmt(x["allowed_overlap"])]
                         for x in rule["shapes"]])  # fmt: skip
    return lines


def _note(x: dict) -> str:
    return f" ({x['note']})" if x["note"] and x["note"] != NOT_MEASURED else ""


def _fmt(v, spec: str = "") -> str:
    return NOT_MEASURED if v is None else format(v, spec)


def _interval(iv) -> str:
    if iv is None:
        return NOT_MEASURED
    return f"c <= {iv[1]:.4g}" if iv[0] == 0 else f"{iv[0]:.4g} < c <= {iv[1]:.4g}"
