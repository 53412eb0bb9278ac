"""pytest set-up of the benchmark suites.

- Collects ``bench_*.py`` (the repository's ``pytest`` run over tests/ never sees them).
- Orders tests by ``bench_priority`` so that when a time budget is set (LEGO_BENCH_BUDGET_S, seconds) and spent,
  what is skipped is what matters least (each such skip says so): 0 the fused ops, 1 the training steps, 2 the
  headline sampling pair, 3 torch.compile of the op references, extra training rows and the brick, 4 the batch-size
  sweeps, 5 the other sampling rows, 6 the compiled brick and the L-size pixel models' sampling.
- Measures the device's ceilings once per session (``peaks`` fixture) and records device facts, ceilings and every
  test's outcome (with skip reasons) into pytest-benchmark's machine info and into LEGO_BENCH_SIDECAR (a JSON file)
  for ``benchmarks.report``.
- Times pytest-benchmark's own rounds with ``harness.sync_timer`` (GPU work included).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from benchmarks import cases, harness

_STATE: dict = {"device": None, "peaks": None, "outcomes": [], "start": None}


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_priority(n): run order of a benchmark (0 first); see conftest.py")
    config.addinivalue_line("markers", "quick: a row of `benchmarks.report --quick` (LEGO_BENCH_QUICK=1)")
    if harness.device().type == "cpu":
        # Tiny CPU ops: one thread. With two, OpenMP's spinning makes a shared 2-core machine 10-100x slower.
        torch.set_num_threads(1)


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _priority(item) -> int:
    marker = item.get_closest_marker("bench_priority")
    if marker is not None:
        return int(marker.args[0])
    return int(getattr(item.module, "PRIORITY", 5))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LEGO_BENCH_QUICK", "0") not in ("", "0"):
        dropped = [item for item in items if item.get_closest_marker("quick") is None]
        items[:] = [item for item in items if item.get_closest_marker("quick") is not None]
        config.hook.pytest_deselected(items=dropped)
    items.sort(key=_priority)  # stable: file and parameter order within a priority
    for item in items:
        item.add_marker(pytest.mark.benchmark(timer=harness.sync_timer, disable_gc=False))


def pytest_sessionstart(session):
    _STATE["start"] = time.monotonic()


def pytest_runtest_setup(item):
    budget = os.environ.get("LEGO_BENCH_BUDGET_S")
    if budget and time.monotonic() - _STATE["start"] > float(budget):
        pytest.skip(f"the run's time budget of {float(budget):g} s (LEGO_BENCH_BUDGET_S) was spent before this test")


def pytest_runtest_logreport(report):
    if report.when != "call" and report.outcome == "passed":
        return
    entry = {"test": report.nodeid, "outcome": report.outcome, "when": report.when, "duration_s": report.duration}
    if report.skipped and isinstance(report.longrepr, tuple):
        entry["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        entry["reason"] = crash.message if crash is not None else str(report.longrepr)[-2000:]
    _STATE["outcomes"].append(entry)


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    dev = harness.device()
    if _STATE["device"] is None:
        _STATE["device"] = harness.device_info(dev)
    return dev


@pytest.fixture(scope="session")
def peaks(bench_device) -> dict:
    """Measured HBM bandwidth and bf16 matmul ceilings of this device, once per session."""
    if _STATE["peaks"] is None:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        _STATE["peaks"] = harness.measure_peaks(bench_device)
    return _STATE["peaks"]


@pytest.fixture(autouse=True)
def _fresh(peaks):
    """Every benchmark: ceilings measured first, a fixed seed, and freed memory afterwards."""
    torch.manual_seed(0)
    yield
    harness.cleanup()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lego"] = {"device": _STATE["device"], "peaks": _STATE["peaks"]}


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LEGO_BENCH_SIDECAR")
    if not path:
        return
    if _STATE["device"] is None:
        _STATE["device"] = harness.device_info(harness.device())
    sidecar = {
        "device": _STATE["device"],
        "peaks": _STATE["peaks"],
        "outcomes": _STATE["outcomes"],
        "elapsed_s": time.monotonic() - _STATE["start"],
        "exitstatus": int(exitstatus),
        "smoke": harness.SMOKE,
        "settings": harness._jsonable(
            {"ops": harness.OPS, "brick": harness.BRICK, "train": harness.TRAIN, "sample": harness.SAMPLE}
        ),
        "compile_backend": harness.compile_backend(),
        "cases": cases.describe(),
    }
    with open(path, "w") as f:
        json.dump(sidecar, f, indent=1)
