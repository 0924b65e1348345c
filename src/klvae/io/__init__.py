"""The bottom layer: files on disk. ``files`` is the only reader of weight files (``weights_only``, safetensors)
and the one atomic writer; ``checkpoints`` the training-checkpoint format (atomic, SHA-256 sidecar, never NaN
weights); ``cache`` where pretrained weights are looked for. Imports nothing else of klvae but ``errors``."""
