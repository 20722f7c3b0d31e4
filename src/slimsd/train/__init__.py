"""Training: data sources, the latent cache, encoders, losses and objectives, the distillation loop."""
