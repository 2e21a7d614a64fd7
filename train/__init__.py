"""Training of the diffusion view (see the training issue)."""
