"""Data: one dataset abstraction (lego.data.datasets) for the embedded digits, .npz, folders and memory-mapped .npy,
the training loader, the autoencoder of latent models, encoding into latents, and writing sample images."""
