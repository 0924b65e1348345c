"""Evaluation: PSNR/SSIM/LPIPS/rFID (``metrics``), latent statistics and scale factors (``latent_stats``),
EQ-VAE latent metrics (``latent_metrics``), evaluation images (``data``) and ``klvae-eval`` (``evaluate``)."""
