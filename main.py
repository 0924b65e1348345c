"""Train the KL autoencoder: ``python main.py --base configs/autoencoder_kl_f8.yaml -t --gpus 0,``.

A thin entry point; the command line lives in :mod:`klvae.training.cli` (``python main.py --help``).
"""

import sys

from klvae.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
