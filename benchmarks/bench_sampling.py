"""Sampling throughput, LEGO against DiT at equal NFE: EDM's Heun sampler (n steps: 2n - 1 network calls) and DDPM
(2n - 1 steps), with and without classifier-free guidance (both halves in one batched call), LEGO with and without
skipping its top brick at t_break = 0.5 (lego.skip_schedule), bf16 autocast. One round is one whole
sampler run from noise to images; images/s = batch / that time. FLOPs are summed over the calls actually made (each
call's batch and skipped bricks are logged during the warm-up run).
"""

import pytest
import torch

from benchmarks import cases, harness
from lego.diffusion.samplers import ddpm_sampler, edm_sampler, skip_schedule

PRIORITY = 2

SAMPLERS = {"heun": edm_sampler, "ddpm": ddpm_sampler}


class CallLog:
    """Passes calls to the network and notes each one's batch and skipped bricks."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, x, sigma, class_labels=None, skip=()):
        self.calls.append((x.shape[0], tuple(skip)))
        return self.net(x, sigma, class_labels, skip=skip)


def _params(sample_cases):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.bench_priority(c.priority)]
                         + ([pytest.mark.quick] if cases.quick_sample(c) else [])) for c in sample_cases]  # fmt: skip


@pytest.mark.parametrize("case", _params(cases.SAMPLE_CASES))
def test_sampling(benchmark, bench_device, case):
    m, g, dev = case.model, case.model.group, bench_device
    batch = g.sample_batch
    net = case.model.build(dev).eval()
    skip = skip_schedule(net, case.t_break) if case.t_break > 0 else None
    logged = CallLog(net)
    latents = torch.randn(batch, g.channels, g.resolution, g.resolution, device=dev)  # (B, C, H, W)
    labels = torch.randint(0, cases.NUM_CLASSES, (batch,), device=dev)
    generator = torch.Generator(dev).manual_seed(0)
    sampler = SAMPLERS[case.sampler]

    def run():
        with harness.autocast(dev):
            sampler(logged, latents, labels, num_steps=case.steps, cfg_scale=case.cfg, skip=skip, generator=generator)

    run()
    calls = list(logged.calls)
    flops = sum(m.forward_flops(net, b, skip=s) for b, s in calls)
    no_skip_flops = sum(m.forward_flops(net, b) for b, _ in calls)
    timing = harness.measure_or_skip_oom(benchmark, run, harness.SAMPLE, dev, f"{m.label} sampling at batch {batch}")
    harness.record(
        benchmark, kind="sample", model=m.name, label=m.label, group=g.name, sampler=case.sampler, steps=case.steps,
        nfe=len(calls), cfg=case.cfg, t_break=case.t_break, batch=batch, images=batch, flops=flops,
        skipped_flops_share=1 - flops / no_skip_flops, skipped_calls=sum(1 for _, s in calls if s),
        config=m.config(), canvas=[g.channels, g.resolution, g.resolution], timing=timing,
        amp_dtype=harness.amp_dtype(dev),
    )  # fmt: skip
