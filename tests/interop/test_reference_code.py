"""klvae's weights in the original reference code: ``scripts/reference_roundtrip.py`` run as a user runs it.

The slow tests need checkouts of the reference repositories (nothing is downloaded)::

    KLVAE_LDM_REPO=/path/to/latent-diffusion KLVAE_FLUX_REPO=/path/to/flux \\
        .venv/bin/python -m pytest -q -m slow tests/interop/test_reference_code.py

``KLVAE_LDM_REPO`` is a CompVis/latent-diffusion checkout (cases ``ldm-kl-f8``, ``ldm-c16``, ``ldm-c16-noquant``),
``KLVAE_FLUX_REPO`` a black-forest-labs/flux checkout (case ``flux``), ``KLVAE_FLUX2_REPO`` a
black-forest-labs/flux2 checkout (case ``flux2``, needs ``einops``); each case is skipped, with the
variable named, when its checkout is not given. They run the script's narrow network (``--small``: the
same code paths as full size, a few seconds per case); the full-size check is the script's default.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.cli_helpers import REPO

SCRIPT = str(REPO / "scripts" / "reference_roundtrip.py")
# case -> (environment variable with the checkout, the script's flag for it, the repository)
CASE_REPOS = {
    "ldm-kl-f8": ("KLVAE_LDM_REPO", "--ldm-repo", "CompVis/latent-diffusion"),
    "ldm-c16": ("KLVAE_LDM_REPO", "--ldm-repo", "CompVis/latent-diffusion"),
    "ldm-c16-noquant": ("KLVAE_LDM_REPO", "--ldm-repo", "CompVis/latent-diffusion"),
    "flux": ("KLVAE_FLUX_REPO", "--flux-repo", "black-forest-labs/flux"),
    "flux2": ("KLVAE_FLUX2_REPO", "--flux2-repo", "black-forest-labs/flux2"),
}
# Outputs each case compares (encode: posterior mean and logvar; decode), per file the reference loads.
MIN_COMPARISONS = {"ldm-kl-f8": 6, "ldm-c16": 6, "ldm-c16-noquant": 3, "flux": 7, "flux2": 6}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASE_REPOS))
def test_reference_code_loads_klvae_weights_strictly_and_matches(case: str) -> None:
    env_var, flag, repo = CASE_REPOS[case]
    checkout = os.environ.get(env_var)
    if not checkout:
        pytest.skip(f"{env_var} is not set: point it at a checkout of {repo} to run case {case!r}")
    done = _run(flag, checkout, "--cases", case, "--small")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"PASS: {case}" in done.stdout, output
    diffs = [float(d) for d in re.findall(r"max\|Δ\| (\S+)", done.stdout)]
    assert len(diffs) >= MIN_COMPARISONS[case], output
    assert max(diffs) <= 1e-4, output
    assert "with strict=True" in done.stdout, output


def test_reference_roundtrip_refuses_a_folder_that_is_not_a_checkout(tmp_path) -> None:
    done = _run("--ldm-repo", str(tmp_path), "--cases", "ldm-kl-f8")
    assert done.returncode == 2
    assert f"--ldm-repo {str(tmp_path)!r} is not a checkout of CompVis/latent-diffusion" in done.stderr
    assert "ldm/models/autoencoder.py does not exist" in done.stderr


def test_reference_roundtrip_names_the_missing_checkout() -> None:
    done = _run("--cases", "flux")
    assert done.returncode == 2
    assert "--flux-repo is required" in done.stderr and "black-forest-labs/flux" in done.stderr
