"""Metrics: feature networks, Fréchet distances, the cost of sampling, and scoring checkpoints (lego.eval,
lego.heldout)."""
