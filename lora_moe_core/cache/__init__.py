"""Step 2, the latent cache: WAN VAE + UMT5 encoding of the clips, ROI weight maps."""
