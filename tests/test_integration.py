"""Features that were built apart, used together: converted checkpoints, DiT models and a base brick through
lego.train (--resume, --compile, torchrun's wrapping), lego.sample and lego.eval. CI-sized: 16 x 16, a few steps."""

import dataclasses

import torch

from lego.checkpoint import load_checkpoint, save_checkpoint
from lego.models import LegoModel, model_config
from lego.train import main as train_main


def test_a_checkpoint_outside_the_registry_resumes(tmp_path):
    """lego.convert names a model after the snapshot (e.g. lego_T_PG_32) and records its resolution: --resume must
    take the model from the checkpoint, not look that name up in the registry."""
    run = tmp_path / "conv"
    config = dataclasses.replace(model_config("LEGO-T-PG-16", in_channels=1, num_classes=10), name="lego_T_PG_16",
                                 time_scale=1.0)
    model = LegoModel(config)
    train_config = {"model": config.name, "resolution": 16, "precond": "edm", "steps": 0, "out": str(run)}
    save_checkpoint(run / "checkpoint.safetensors", model, LegoModel(config), torch.optim.AdamW(model.parameters()), 0,
                    train_config)  # as lego.convert writes it
    argv = ["--resume", "--out", str(run), "--steps", "1", "--batch", "2", "--sample-n", "0", "--no-progress"]
    assert train_main(argv) == 0
    after = load_checkpoint(run / "checkpoint.safetensors")
    assert after.step == 1 and after.model_config == config
