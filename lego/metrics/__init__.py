"""Metrics: feature networks (the MNIST classifier; ADM's Inception-v3 metrics: FID, sFID, IS, precision, recall),
Fréchet distances, and scoring checkpoints (lego.eval, lego.heldout)."""
