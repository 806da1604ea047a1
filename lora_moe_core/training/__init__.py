"""Training: flow matching, losses, data, state/resume, monitoring, and the Stage 1/2/3 recipes."""
