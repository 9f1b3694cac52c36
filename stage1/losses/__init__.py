"""Training losses of the tokenizers: perceptual (LPIPS) and adversarial (PatchGAN)."""
