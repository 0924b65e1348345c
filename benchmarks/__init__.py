"""klvae's benchmarks and its GPU check: scripts and their measurement helpers, not part of the package.

``src/klvae`` never imports from here. The scripts run from the repository root, either as files
(``python benchmarks/train_step.py``) or as modules (``python -m benchmarks.train_step``); the tests import
them as this package (the repository root is on ``sys.path`` under pytest).
"""
