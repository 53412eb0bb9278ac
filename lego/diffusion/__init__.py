"""Diffusion: the preconditioning wrapper that makes a backbone a denoiser, the joint loss, the samplers, guidance,
the sliding window and one ``generate()``. Everything here calls a model only as ``net(x, sigma, labels, ...)``."""
