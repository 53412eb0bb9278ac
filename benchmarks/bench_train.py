"""Training step, LEGO against DiT: forward + backward + AdamW under bf16 autocast, fp32 weights, same batch, device
and run. LEGO steps are lego.LegoLoss (the joint loss over every brick); DiT steps are the same EDM loss on its one
output (benchmarks.dit). images/s = batch / step time; MFU = 3 x forward FLOPs per second / measured bf16 peak.
"""

import pytest
import torch

from benchmarks import cases, harness
from benchmarks.dit import dit_loss
from lego import LegoLoss

PRIORITY = 1


def run_train(benchmark, case: cases.ModelCase, batch: int, dev: torch.device, sweep: bool = False):
    g = case.group
    net = case.build(dev).train()
    images = 0.5 * torch.randn(batch, g.channels, g.resolution, g.resolution, device=dev)  # (B, C, H, W)
    labels = torch.randint(0, cases.NUM_CLASSES, (batch,), device=dev)
    generator = torch.Generator(dev).manual_seed(0)
    loss_fn = dit_loss if case.is_dit else LegoLoss(patch_fraction=case.patch_fraction, label_dropout=0.1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0, fused=dev.type == "cuda")

    def step():
        with harness.autocast(dev):
            loss, _ = loss_fn(net, images, labels, generator)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    timing = harness.measure_or_skip_oom(benchmark, step, harness.TRAIN, dev, f"{case.label} at batch {batch}")
    fwd = case.forward_flops(net, batch, patch_fraction=case.patch_fraction)
    params = sum(p.numel() for p in net.parameters())
    return harness.record(
        benchmark, kind="train", model=case.name, label=case.label, group=g.name, batch=batch, sweep=sweep,
        patch_fraction=case.patch_fraction, backend=case.backend, config=case.config(), params=params,
        canvas=[g.channels, g.resolution, g.resolution], flops=3 * fwd, fwd_flops_per_image=fwd / batch,
        images=batch, timing=timing, amp_dtype=harness.amp_dtype(dev),
    )  # fmt: skip


def _params(train_cases):
    return [pytest.param(c, id=f"{c.id}-{c.group.name}", marks=[pytest.mark.quick] if cases.quick_train(c) else [])
            for c in train_cases]  # fmt: skip


@pytest.mark.parametrize("case", _params(cases.TRAIN_CASES))
def test_train_step(benchmark, bench_device, case):
    run_train(benchmark, case, case.group.train_batch, bench_device)


@pytest.mark.parametrize("case", _params(cases.TRAIN_SWEEP_CASES))
def test_train_step_large_batch(benchmark, bench_device, case):
    """The paper's batch of 256 (an out-of-memory skip says so where a model does not fit)."""
    run_train(benchmark, case, cases.TRAIN_LARGE_BATCH, bench_device)


@pytest.mark.bench_priority(3)
@pytest.mark.parametrize("case", cases.TRAIN_EXTRA_CASES, ids=lambda c: f"{c.id}-{c.group.name}")
def test_train_step_extra(benchmark, bench_device, case):
    run_train(benchmark, case, case.group.train_batch, bench_device)


@pytest.mark.bench_priority(4)
@pytest.mark.parametrize("batch", cases.TRAIN_SWEEP_BATCHES)
@pytest.mark.parametrize("case", cases.TRAIN_SWEEP_CASES, ids=lambda c: c.id)
def test_train_sweep(benchmark, bench_device, case, batch):
    run_train(benchmark, case, batch, bench_device, sweep=True)
