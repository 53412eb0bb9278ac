"""Checkpoints: the file format (lego.checkpoints.format), building denoisers from configs, checkpoints and pretrained
bases (lego.checkpoints.build), and reading the authors' released snapshots (lego.checkpoints.snapshots)."""
