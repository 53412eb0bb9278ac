"""The networks: adaLN-Zero blocks, the LEGO brick, the LEGO stack and its registry, the DiT backbone.

Backbones give their per-brick raw outputs through one interface (lego.networks.interface); the preconditioning that
turns them into a denoiser lives one layer up, in lego.diffusion. Nothing here reads a file.
"""
