"""Step 1, the data: dataset input, synthetic clips, video decoding, caption labels, reading latent caches."""
