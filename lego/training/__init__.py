"""Training: the run's options and their checks, the loop, the run folder (lock, signals, atomic checkpoints), and
data-parallel training on torch.distributed."""
