"""The static kernel profile (benchmarks/static.py) as a CI gate, with no GPU.

Once per session and per Triton version a child process runs ``python -m benchmarks.static --no-cuda`` (every Triton
launch of a training and a sampling step of LEGO-XL-PG-32, LEGO-XL-U-32, LEGO-S-PG-64, LEGO-L-PG-64, LEGO-XL-PG-64 and
LEGO-XL-U-64 at batch 64 and 256, in bf16 and fp32, compiled for sm_90 and sm_80 with the real specialization; Triton's
on-disk cache makes a rerun quick). The Triton versions: the one installed, and each folder in LEGO_STATIC_TRITONS
(os.pathsep-separated ``pip install --target`` folders put first on the child's PYTHONPATH; .ci/run installs Triton 3.6,
the GPU machine's, there). Every real launch configuration then has to pass, on each target:

- spills: no local-memory spills;
- waves: a memory-bound launch whose work would fill two waves (>= 8 KB per program) runs at least two waves, or,
  for a kernel whose outputs are per-group sums (static.REDUCTIONS: the adaLN backward's per-image dshift/dscale/dgate),
  at least as many programs as its partial sums allow within the bytes bound: one program per group needs no partials,
  C per group cost groups x C partials written and read back, which may add at most 0.1x the op's minimum bytes
  (static.programs_needed, proven on hand-made numbers below);
- bytes: an op call moves at most 1.1x its minimum bytes (inputs read once, outputs written once);
- rounds: the S <= 16 attention forward and the gated adaLN forward issue at most one group of dependent global
  loads before their first store.

A case is one kernel (or op) at one brick shape in one dtype, over every model, batch and step that launches it; a
test is one case on one target under one Triton version (its id: ``triton3.6-sm_90-<case>``). The cases are read from
the committed profiles (benchmarks/results/static-profile-triton<version>.json, one per version);
test_committed_profile_is_current fails when the code launches kernels a file does not list (regenerate it). A version
with a committed profile that is not available in this run skips its cases. The known violations are KNOWN_VIOLATIONS,
one line each, as strict xfails: when a fix lands the case XPASSes, which fails, and its line has to go.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import static
from benchmarks.static import (
    MAX_BYTES_RATIO,
    access_width,
    case_name,
    load_rounds,
    parse_ptxas,
    parse_sass,
    resident_ctas,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ARCHS = ("sm_90", "sm_80")


def _committed() -> dict[str, Path]:
    """Triton version -> its committed profile."""
    prefix = static.profile_stem("")
    return {p.stem.removeprefix(prefix): p for p in sorted(RESULTS.glob(f"{prefix}*.json"))}


COMMITTED = _committed()

# Today's violations, one line per (Triton version, target, case) under its reason: a strict xfail each. Remove a line
# when its fix lands (the case XPASSes).
ITEM5_BWD_GRID = (
    "issue 8 item 5: the fused patch_embed backward (with input gradients: each program spans d for dx, so each token "
    "tile adds d x K to dweight with atomics) runs as many programs as that L2 atomic traffic allows (<= dtok's bytes, "
    "lego_kernels/patch_embed.py _bwd_config): under two waves at B 64"
)
ITEM5_BYTES = (
    "issue 8 item 5: the fused patch_embed backward's fp32 dweight accumulator (zeroed, then read for the cast: "
    "8 x d x K bytes) is over 10% of the op's minimum where K is large against the tokens (fields of 4 x 4 and 8 x 8)"
)
ITEM5_FEW_TOKENS = (
    "issue 8 item 5: XL-U-32's 16 x 16 brick has few tokens against K (1024 at B 64, K 640): at B 64 the patch_embed "
    "backward reads dtok twice (2 T d bytes, less than the fused kernel's fp32 accumulator, 8 d K), dweight in one "
    "piece on d/64 x K/64 = 180 programs (bf16); at B 256 the fused kernel's accumulator is still 29% of the minimum"
)
SM80_WAVES = (
    "issue 20: on sm_80 (A100, 108 SMs, and fewer resident CTAs at fp32's registers) at B 64 these grids, sized for "
    "sm_90, run under two waves; no A100 is at hand to measure a retile"
)
ADALN_FWD_ONE_ROW = (
    "issue 20: the adaLN forward runs one row per program, the most programs a row-wise LayerNorm can have; XL-U-32's "
    "16 x 16 brick at B 64 in fp32 has 1024 rows, at 16 warps 1.94 waves of the 2 asked (132 SMs x 4 programs)"
)
PATCH_EMBED_FWD_WAVES = (
    "issue 20: the patch_embed forward at d 1024 (LEGO-L-PG-64's 16 x 16 brick at B 64) stops shrinking its sequence "
    "tile at _FWD_PROGRAMS = 512 programs, 1.94 waves where 528 programs are asked; found at the issue's model shapes"
)


def _known(table: dict[str, str]) -> dict[tuple[str, str, str, str], str]:
    """{(check, triton, target, case): reason} from {reason: lines of "<check> <triton> <target> <case>"}."""
    return {tuple(line.split()): reason for reason, lines in table.items() for line in lines.strip().splitlines()}


KNOWN_VIOLATIONS = _known(
    {
        ADALN_FWD_ONE_ROW: """
            waves 3.6 sm_90 adaln_fwd_kernel@r16-l8-S4-d1152@fp32
            waves 3.9 sm_90 adaln_fwd_kernel@r16-l8-S4-d1152@fp32
        """,
        ITEM5_BWD_GRID: """
            waves 3.6 sm_80 patch_embed_bwd_kernel@r32-l2-S256-d1152@bf16
            waves 3.6 sm_80 patch_embed_bwd_kernel@r32-l2-S256-d1152@fp32
            waves 3.6 sm_80 patch_embed_bwd_kernel@r4-l2-S4-d1152@bf16
            waves 3.6 sm_80 patch_embed_bwd_kernel@r8-l4-S4-d1152@bf16
            waves 3.6 sm_80 patch_embed_bwd_kernel@r8-l4-S4-d1152@fp32
            waves 3.6 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d1024@bf16
            waves 3.6 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d1024@fp32
            waves 3.6 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d1152@bf16
            waves 3.6 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d1152@fp32
            waves 3.6 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d384@bf16
            waves 3.6 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d384@fp32
            waves 3.6 sm_90 patch_embed_bwd_kernel@r32-l2-S256-d1152@bf16
            waves 3.6 sm_90 patch_embed_bwd_kernel@r32-l2-S256-d1152@fp32
            waves 3.6 sm_90 patch_embed_bwd_kernel@r4-l2-S4-d1152@bf16
            waves 3.6 sm_90 patch_embed_bwd_kernel@r4-l2-S4-d1152@fp32
            waves 3.6 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d1024@bf16
            waves 3.6 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d1024@fp32
            waves 3.6 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d1152@bf16
            waves 3.6 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d1152@fp32
            waves 3.6 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d384@bf16
            waves 3.6 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d384@fp32
            waves 3.6 sm_90 patch_embed_bwd_kernel@r8-l4-S4-d1152@bf16
            waves 3.6 sm_90 patch_embed_bwd_kernel@r8-l4-S4-d1152@fp32
            waves 3.9 sm_80 patch_embed_bwd_kernel@r32-l2-S256-d1152@bf16
            waves 3.9 sm_80 patch_embed_bwd_kernel@r4-l2-S4-d1152@bf16
            waves 3.9 sm_80 patch_embed_bwd_kernel@r8-l4-S4-d1152@bf16
            waves 3.9 sm_80 patch_embed_bwd_kernel@r8-l4-S4-d1152@fp32
            waves 3.9 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d1024@bf16
            waves 3.9 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d1024@fp32
            waves 3.9 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d1152@bf16
            waves 3.9 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d1152@fp32
            waves 3.9 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d384@bf16
            waves 3.9 sm_90 patch_embed_bwd_kernel@r16-l8-S4-d384@fp32
            waves 3.9 sm_90 patch_embed_bwd_kernel@r32-l2-S256-d1152@bf16
            waves 3.9 sm_90 patch_embed_bwd_kernel@r32-l2-S256-d1152@fp32
            waves 3.9 sm_90 patch_embed_bwd_kernel@r4-l2-S4-d1152@bf16
            waves 3.9 sm_90 patch_embed_bwd_kernel@r4-l2-S4-d1152@fp32
            waves 3.9 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d1024@bf16
            waves 3.9 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d1024@fp32
            waves 3.9 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d1152@bf16
            waves 3.9 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d1152@fp32
            waves 3.9 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d384@bf16
            waves 3.9 sm_90 patch_embed_bwd_kernel@r64-l2-S1024-d384@fp32
            waves 3.9 sm_90 patch_embed_bwd_kernel@r8-l4-S4-d1152@bf16
            waves 3.9 sm_90 patch_embed_bwd_kernel@r8-l4-S4-d1152@fp32
        """,
        ITEM5_BYTES: """
            bytes 3.6 sm_90 patch_embed_bwd@r16-l8-S4-d1024@bf16
            bytes 3.6 sm_90 patch_embed_bwd@r16-l8-S4-d384@bf16
            bytes 3.6 sm_90 patch_embed_bwd@r8-l4-S4-d1152@bf16
            bytes 3.9 sm_90 patch_embed_bwd@r16-l8-S4-d1024@bf16
            bytes 3.9 sm_90 patch_embed_bwd@r16-l8-S4-d384@bf16
            bytes 3.9 sm_90 patch_embed_bwd@r8-l4-S4-d1152@bf16
        """,
        ITEM5_FEW_TOKENS: """
            bytes 3.6 sm_90 patch_embed_bwd@r16-l8-S4-d1152@bf16
            bytes 3.6 sm_90 patch_embed_bwd@r16-l8-S4-d1152@fp32
            bytes 3.9 sm_90 patch_embed_bwd@r16-l8-S4-d1152@bf16
            bytes 3.9 sm_90 patch_embed_bwd@r16-l8-S4-d1152@fp32
            waves 3.6 sm_80 patch_embed_bwd_weight_kernel@r16-l8-S4-d1152@bf16
            waves 3.6 sm_90 patch_embed_bwd_weight_kernel@r16-l8-S4-d1152@bf16
            waves 3.9 sm_80 patch_embed_bwd_weight_kernel@r16-l8-S4-d1152@bf16
            waves 3.9 sm_90 patch_embed_bwd_weight_kernel@r16-l8-S4-d1152@bf16
        """,
        PATCH_EMBED_FWD_WAVES: """
            waves 3.6 sm_90 patch_embed_fwd_kernel@r16-l8-S4-d1024@bf16
            waves 3.9 sm_90 patch_embed_fwd_kernel@r16-l8-S4-d1024@bf16
        """,
        SM80_WAVES: """
            waves 3.6 sm_80 patch_embed_bwd_input_kernel@r16-l8-S4-d1152@fp32
            waves 3.6 sm_80 patch_embed_fwd_kernel@r16-l8-S4-d1152@fp32
            waves 3.9 sm_80 patch_embed_bwd_input_kernel@r16-l8-S4-d1152@fp32
            waves 3.9 sm_80 patch_embed_fwd_kernel@r16-l8-S4-d1152@fp32
        """,
    }
)

pytest.importorskip("triton", reason="the static profile compiles Triton kernels")


def _tritons() -> dict[str, str]:
    """The Triton environments of this run: PYTHONPATH prefix ("" for the installed one) -> major.minor version."""
    prefixes = [""] + [p for p in os.environ.get("LEGO_STATIC_TRITONS", "").split(os.pathsep) if p]
    found = {}
    for prefix in prefixes:
        done = subprocess.run([sys.executable, "-c", "from benchmarks.static import triton_version as v; print(v())"],
                              cwd=REPO, env=_child_env(prefix), capture_output=True, text=True, timeout=300,
                              check=False)  # fmt: skip
        assert done.returncode == 0, f"Triton at {prefix or 'the installed one'}: {done.stderr[-2000:]}"
        found.setdefault(done.stdout.strip(), prefix)
    return {prefix: version for version, prefix in found.items()}


def _child_env(prefix: str = "") -> dict:
    # The profile compiles real kernels: no interpreter (conftest turns it on for the rest of the suite).
    path = os.pathsep.join(p for p in (prefix, str(REPO)) if p)
    return dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=path)


@pytest.fixture(scope="session")
def tritons() -> dict[str, str]:
    """major.minor version -> PYTHONPATH prefix, for the Triton versions available to this run."""
    return {version: prefix for prefix, version in _tritons().items()}


@pytest.fixture(scope="session")
def profiles(tmp_path_factory, tritons):
    """version -> its fresh profile, built on first use (a child process per version)."""

    @functools.cache
    def build(version: str) -> dict:
        if version not in tritons:
            pytest.skip(f"Triton {version} is not available here (install it with pip install --target DIR "
                        f"triton=={version}.* and set LEGO_STATIC_TRITONS=DIR)")  # fmt: skip
        out = tmp_path_factory.mktemp(f"static-profile-{version}")
        cmd = [sys.executable, "-m", "benchmarks.static", "--no-cuda", "--quiet", "--out", str(out)]
        done = subprocess.run(cmd, cwd=REPO, env=_child_env(tritons[version]), capture_output=True, text=True,
                              timeout=3600, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads((out / f"{static.profile_stem(version)}.json").read_text())

    return build


def _cases(profile: dict) -> dict[str, set[str]]:
    """check -> the cases a profile holds."""
    launches = profile["launches"]
    return {
        "spills": {case_name(e["kernel"], e["brick"], e["dtype"]) for e in launches},
        "waves": {case_name(e["kernel"], e["brick"], e["dtype"]) for e in launches},
        "bytes": {case_name(e["op"], e["brick"], e["dtype"]) for e in profile["ops"]},
        "rounds": {static.rounds_case(e) for e in launches} - {None},
    }


def _params(check: str):
    # The bytes come from the first target's compiled code (which arguments it loads): one test per op case there.
    archs = ARCHS[:1] if check == "bytes" else ARCHS
    params = []
    for version, path in COMMITTED.items():
        for case in sorted(_cases(json.loads(path.read_text()))[check]):
            for arch in archs:
                key = (check, version, arch, case)
                marks = (
                    [pytest.mark.xfail(strict=True, reason=KNOWN_VIOLATIONS[key])] if key in KNOWN_VIOLATIONS else []
                )
                params.append(pytest.param(version, arch, case, id=f"triton{version}-{arch}-{case}", marks=marks))
    return params


def _launches(profile: dict, case: str) -> list[dict]:
    found = [e for e in profile["launches"] if case_name(e["kernel"], e["brick"], e["dtype"]) == case]
    assert found, f"{case}: no such launch in the fresh profile (regenerate {static.profile_stem(profile['triton'])})"
    return found


def _where(e: dict) -> str:
    return f"{e['specialization']} grid {tuple(e['grid'])} in {'; '.join(e['scenarios'])}"


def test_committed_profile_is_current(profiles, tritons):
    """Each available Triton version has a committed profile listing exactly the cases the code launches today."""
    for version in tritons:
        assert version in COMMITTED, f"no committed profile for Triton {version}: run python -m benchmarks.static"
        committed, fresh = _cases(json.loads(COMMITTED[version].read_text())), _cases(profiles(version))
        for check in fresh:
            assert fresh[check] == committed[check], (
                f"Triton {version}, {check}: cases launched now but not in the committed profile: "
                f"{sorted(fresh[check] - committed[check])}; in it but no longer launched: "
                f"{sorted(committed[check] - fresh[check])}. Rerun python -m benchmarks.static"
            )


def test_known_violations_name_real_cases():
    """Every line of KNOWN_VIOLATIONS names a case of a committed profile (a misspelt one would never apply)."""
    real = {
        (check, version, arch, case)
        for version, path in COMMITTED.items()
        for check, cases in _cases(json.loads(path.read_text())).items()
        for case in cases
        for arch in ARCHS
    }
    assert [key for key in KNOWN_VIOLATIONS if key not in real] == []


def test_profile_covers_every_op_brick_dtype_and_target(profiles, tritons):
    """The capture really ran the models: every fused op, forward and backward, at every brick shape of them, in both
    dtypes and on both targets, and every row names its Triton version and dtype."""
    for version in tritons:
        profile = profiles(version)
        ops = {e["op"] for e in profile["ops"]}
        for op in ("patch_embed", "short_attention", "adaln_modulate", "gated_residual_adaln", "patch_unembed"):
            assert {f"lego::{op}_fwd", f"lego::{op}_bwd"} <= ops, op
        bricks = {e["brick"] for e in profile["launches"]}
        assert {"r4 l4 S1 d1152", "r8 l4 S4 d1152", "r32 l2 S256 d1152"} <= bricks  # LEGO-XL-PG-32
        assert {"r16 l8 S4 d1152", "r4 l2 S4 d1152"} <= bricks  # LEGO-XL-U-32
        assert {"r4 l2 S4 d384", "r16 l8 S4 d384", "r64 l2 S1024 d384"} <= bricks  # LEGO-S-PG-64
        assert {"r4 l2 S4 d1024", "r16 l8 S4 d1024", "r64 l2 S1024 d1024"} <= bricks  # LEGO-L-PG-64
        assert {"r4 l4 S1 d1152", "r16 l8 S4 d1152", "r64 l2 S1024 d1152"} <= bricks  # LEGO-XL-PG-64, LEGO-XL-U-64
        scenarios = {s for e in profile["launches"] for s in e["scenarios"]}
        assert len(scenarios) == len(static.MODELS) * 2 * 2 * 2, sorted(scenarios)  # models x batches x dtypes x steps
        assert {e["dtype"] for e in profile["launches"]} == {"bf16", "fp32"}
        assert all(e["triton"] == version for e in profile["launches"] + profile["ops"])
        assert all(set(e["arch"]) == set(ARCHS) for e in profile["launches"])
        assert all(e["arch"][arch]["registers"] > 0 for e in profile["launches"] for arch in ARCHS)


@pytest.mark.parametrize(("version", "arch", "case"), _params("spills"))
def test_no_spills(profiles, version, arch, case):
    bad = [e for e in _launches(profiles(version), case)
           if e["arch"][arch]["spill_bytes"] or e["arch"][arch]["spill_instructions"]]  # fmt: skip
    assert not bad, "\n".join(
        f"{_where(e)}: {e['arch'][arch]['spill_bytes']} B of local memory, {e['arch'][arch]['registers']} registers"
        for e in bad
    )


@pytest.mark.parametrize(("version", "arch", "case"), _params("waves"))
def test_grid_fills_two_waves(profiles, version, arch, case):
    bad = [e for e in _launches(profiles(version), case) if e["programs"] < e["arch"][arch]["programs_needed"]]
    assert not bad, "\n".join(
        f"{_where(e)}: {e['programs']} programs = {e['arch'][arch]['waves']} waves of "
        f"{e['arch'][arch]['ctas_per_sm']} CTAs x {static.SM_LIMITS[int(arch[3:])]['sms']} SMs for "
        f"{e['bytes'] / 1e6:.1f} MB; {e['arch'][arch]['programs_needed']} needed"
        for e in bad
    )


@pytest.mark.parametrize(("version", "arch", "case"), _params("bytes"))
def test_bytes_near_minimum(profiles, version, arch, case):
    found = [e for e in profiles(version)["ops"] if case_name(e["op"], e["brick"], e["dtype"]) == case]
    assert found, f"{case}: no such op in the fresh profile"
    bad = [e for e in found if e["ratio"] > MAX_BYTES_RATIO]
    assert not bad, "\n".join(
        f"{e['op']} at {e['brick']} in {'; '.join(e['scenarios'])}: {e['bytes'] / 1e6:.1f} MB moved for a minimum of "
        f"{e['min_bytes'] / 1e6:.1f} MB ({e['ratio']}x; launches {e['launches']})"
        for e in bad
    )


@pytest.mark.parametrize(("version", "arch", "case"), _params("rounds"))
def test_forward_loads_up_front(profiles, version, arch, case):
    launches = [e for e in profiles(version)["launches"] if static.rounds_case(e) == case]
    assert launches, f"{case}: no such launch in the fresh profile (regenerate {static.profile_stem(version)})"
    bad = [e for e in launches if e["arch"][arch]["rounds_before_store"] > 1]
    assert not bad, "\n".join(
        f"{_where(e)}: {e['arch'][arch]['rounds_before_store']} dependent load round trips before the first store, "
        f"{e['arch'][arch]['barriers_before_store']} barriers"
        for e in bad
    )


# --- the SASS reader itself ------------------------------------------------------------------------------------------

_SASS = """
	code for sm_90a
		Function : chain
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/              @P0  LDG.E R4, desc[UR4][R2.64] ;           /* 0x0000000402047981 */
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;  /* 0x0000000402087981 */
        /*0030*/                   IMAD.WIDE R6, R4, 0x2, R2 ;            /* 0x0000000204067825 */
        /*0040*/                   LDG.E.U16 R12, desc[UR4][R6.64] ;      /* 0x0000000406067981 */
        /*0050*/                   STS [R0], R11 ;                        /* 0x0000000b00007388 */
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;          /* 0x0000000000007b1d */
        /*0070*/                   STG.E desc[UR4][R6.64], R12 ;          /* 0x0000000c06007986 */
        /*0080*/                   LDG.E R13, desc[UR4][R2.64] ;          /* 0x0000000402037981 */
        /*0090*/                   EXIT ;                                 /* 0x000000000000794d */
		Function : flat
        /*0000*/                   LDG.E.64 R4, desc[UR4][R2.64] ;        /* 0x0000000402047981 */
        /*0010*/                   LDG.E.64 R6, desc[UR4][R2.64+0x8] ;    /* 0x0000000402067981 */
        /*0020*/                   FADD R8, R5, R7 ;                      /* 0x0000000705087221 */
        /*0030*/                   STG.E desc[UR4][R2.64], R8 ;           /* 0x0000000802007986 */
        /*0040*/                   EXIT ;                                 /* 0x000000000000794d */
"""


def test_sass_reader_on_text():
    """Two groups in 'chain' (the address of the U16 load is computed from the first load's value), one in 'flat';
    a load after the first store counts toward the total only; .64 results cover two registers."""
    functions = parse_sass(_SASS)
    assert list(functions) == ["chain", "flat"]
    assert functions["flat"][0] == "LDG.E.64 R4, desc[UR4][R2.64]"
    chain, flat = load_rounds(functions["chain"]), load_rounds(functions["flat"])
    assert (chain["rounds_before_store"], chain["rounds_total"], chain["barriers_before_store"]) == (2, 3, 1)
    assert (flat["rounds_before_store"], flat["rounds_total"]) == (1, 1)
    assert [access_width(op) for op in ("LDG.E.128", "LDG.E.64", "LDG.E.U16", "LDG.E", "STG.E.128")] == [
        128,
        64,
        16,
        32,
        128,
    ]


def test_occupancy_rules():
    """Registers in units of 256 per warp, 2048 threads, 32 CTAs, shared memory plus the 1 KB per-CTA reserve."""
    assert resident_ctas(90, 255, 128, 0) == (2, "registers")  # 256 regs x 128 threads = 32768 per CTA
    assert resident_ctas(90, 24, 128, 0) == (16, "threads")
    assert resident_ctas(90, 16, 32, 0) == (32, "CTA slots")
    assert resident_ctas(80, 32, 128, 48 * 1024) == (3, "shared memory")  # 164 KB / 49 KB


def test_waves_rule_on_hand_made_numbers():
    """programs_needed: two waves where each program of two waves moves >= 8 KB; a reduction over G groups is held to
    the programs its partials allow within 0.1x the op's minimum bytes, counted in whole programs per group."""
    per_wave = 528  # 132 SMs x 4 CTAs
    big, small = 2 * per_wave * static.WORK_PER_PROGRAM, 2 * per_wave * static.WORK_PER_PROGRAM - 1
    assert static.programs_needed(big, per_wave) == 1056
    assert static.programs_needed(small, per_wave) == 0  # programs of two waves would move under 8 KB each
    # 64 images of 16 rows at d 1152, K = 2 (adaln_modulate_bwd, bf16): minimum 7.7 MB, a partial 9216 B each way.
    # A second program per image would cost 64 x 2 x 2 x 9216 = 2.4 MB > 0.75 MB: one whole-image program each.
    partial = 2 * 1152 * 4
    mod16 = 64 * 16 * (3 * 1152 * 2 + 8) + 4 * 64 * 1152 * 2
    assert static.programs_allowed_by_bytes(64, partial, mod16) == 64
    assert static.programs_needed(10**9, per_wave, (64, partial), mod16) == 64
    # 64 rows per image: 0.1 x 28.9 MB allows 2 programs per image (3 would be 3.5 MB of partials).
    mod64 = 64 * 64 * (3 * 1152 * 2 + 8) + 4 * 64 * 1152 * 2
    assert static.programs_allowed_by_bytes(64, partial, mod64) == 128
    # 256 rows: 9 per image = 576 programs, fewer than two waves; at B 256 two waves (1056) come first.
    mod256 = 64 * 256 * (3 * 1152 * 2 + 8) + 4 * 64 * 1152 * 2
    assert static.programs_allowed_by_bytes(64, partial, mod256) == 576
    assert static.programs_needed(10**9, per_wave, (64, partial), mod256) == 576
    assert static.programs_needed(10**9, per_wave, (256, partial), 4 * mod256) == 1056
    # The bound is exact: a budget one byte short of the 9th program per image gives 8.
    exact = 64 * 9 * 2 * partial * 10
    assert static.programs_allowed_by_bytes(64, partial, exact) == 576
    assert static.programs_allowed_by_bytes(64, partial, exact - 10) == 512
    # Declared from the launch's arguments: groups = the images (rows of SCALE), K fp32 rows of width d per program.
    scale = torch.empty(64, 1152, device="meta")
    args = {"SCALE": scale, "d": 1152, "HAS_NORM": True, "HAS_RESIDUAL": True}
    assert static.REDUCTIONS["_adaln_bwd_kernel"](args) == (64, 3 * 1152 * 4)
    assert static.REDUCTIONS["_adaln_bwd_kernel"](args | {"HAS_NORM": False}) == (64, 1152 * 4)


def test_ptxas_reader():
    text = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90a'
        ptxas info    : Function properties for _Z6kernelPf
            8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
        ptxas info    : Used 128 registers, used 1 barriers, 8 bytes cumulative stack size, 256 bytes smem
        """)
    (row,) = parse_ptxas(text)
    assert (row["registers"], row["spill_stores"], row["spill_loads"], row["stack"], row["shared_bytes"]) == (
        128, 12, 4, 8, 256)  # fmt: skip
    assert row["function"] in ("kernel", "_Z6kernelPf")


_PROBE = """
import json, sys
import torch
import triton
import triton.language as tl
from benchmarks.static import Launch, compile_kernel, specialize


@triton.jit
def gather(IDX, X, OUT, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    i = tl.load(IDX + offs)          # round trip 1
    v = tl.load(X + i)               # round trip 2: its address is the first load's value
    tl.store(OUT + offs, v)


@triton.jit
def add(A, B, OUT, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(A + offs)            # both loads in flight at once: one round trip
    b = tl.load(B + offs)
    tl.store(OUT + offs, a + b)


out = {}
for name, fn, dtypes in (("gather", gather, (torch.int32, torch.float32)), ("add", add, (torch.bfloat16,) * 2)):
    tensors = [torch.empty(1024, dtype=dt, device="meta") for dt in dtypes + (dtypes[-1],)]
    spec, options = specialize(Launch(fn, (1, 1, 1), tuple(tensors), {"BLOCK": 1024, "num_warps": 4}))
    out[name] = compile_kernel(fn, spec, options, 90)
json.dump(out, sys.stdout)
"""


def test_round_trip_counter_on_compiled_kernels(tmp_path):
    """Compiled for sm_90: a gather through loaded indices takes two round trips, two independent loads one; 16-byte
    aligned bf16 pointers give 128-bit loads and stores."""
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=_child_env(), capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.loads(done.stdout)
    assert res["gather"]["rounds_before_store"] == 2, res["gather"]
    assert res["add"]["rounds_before_store"] == 1, res["add"]
    assert set(res["add"]["loads"]) == {"128"} and set(res["add"]["stores"]) == {"128"}, res["add"]
    assert res["add"]["spill_bytes"] == 0 and res["add"]["registers"] > 0
    assert res["add"]["used_args"] == ["A", "B", "OUT"]


def test_bad_input_is_one_error_line(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        static.main(["--batch", "0"])
    assert exit_info.value.code == 2 and "error: --batch and --jobs take positive numbers" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert static.main(["--batch", "4"]) == 2
    assert capsys.readouterr().err.startswith("error: TRITON_INTERPRET is set")
