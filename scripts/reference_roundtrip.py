"""Check klvae's VAE weights against the original reference code of LDM, FLUX.1 and FLUX.2, not only diffusers.

    python scripts/reference_roundtrip.py --ldm-repo PATH --flux-repo PATH --flux2-repo PATH \
        [--cases ldm-kl-f8 ldm-c16 ldm-c16-noquant flux flux2]

``--ldm-repo`` is a checkout of CompVis/latent-diffusion, ``--flux-repo`` one of black-forest-labs/flux,
``--flux2-repo`` one of black-forest-labs/flux2 (nothing is downloaded; their code is imported from the
checkouts). For each case a klvae network with random
weights is written to disk in the layout that reference code reads, loaded into the reference implementation
with ``load_state_dict(strict=True)``, and both encode and decode the same non-square input (1×3×64×96 in
[-1, 1], float32). The script prints the largest absolute difference of every output and exits 1 when one
is above ``--tol`` (1e-4) or a file does not load strictly, 2 on bad arguments.

Cases:

* ``ldm-kl-f8``: the LDM / Stable Diffusion kl-f8 network (4 latent channels, quant convs) in LDM's
  ``ldm.models.autoencoder.AutoencoderKL``, from two files: ``torch.save({"state_dict": ...})`` of klvae's
  state dict, and that file exported again by ``klvae-export --format ldm --out X.ckpt`` (what users ship).
  Both go through LDM's own ``ckpt_path=`` loader (``init_from_ckpt``, which is not strict), then through
  ``load_state_dict(strict=True)`` on the same ``state_dict``. Compared: posterior mean and logvar (LDM's
  ``DiagonalGaussianDistribution``) and the decode of klvae's posterior mean.
* ``ldm-c16``: the same with 16 latent channels (LDM's ``z_channels: 16, embed_dim: 16``).
* ``ldm-c16-noquant``: an SD3/FLUX.1-shaped network (16 channels, no quant convs) in LDM's ``AutoencoderKL``,
  which always builds the convs: ``klvae-export --identity-quant-convs`` writes them as exact identity 1×1
  convs, and LDM's outputs must equal klvae's network without them.
* ``flux``: FLUX.1's ``AutoEncoder(AutoEncoderParams(...))`` (``src/flux/modules/autoencoder.py``;
  ch 128, ch_mult [1, 2, 4, 4], 2 res blocks, z_channels 16, scale 0.3611, shift 0.1159) loads klvae's
  16-channel network without quant convs written as a bare ``.safetensors`` without metadata (the layout
  of FLUX.1's ``ae.safetensors``). Compared: the mean and logvar halves of FLUX's encoder moments, its
  ``encode`` (scaled and shifted mean), its raw decoder and its ``decode`` (which undoes scale and shift).
  Then ``klvae.load_vae`` reads that bare file back: the tensors alone must say 16 channels, no quant convs.
* ``flux2``: FLUX.2's ``AutoEncoder(AutoEncoderParams(...))`` (``src/flux2/autoencoder.py``; z_channels 32,
  quant convs inside its Encoder/Decoder, ``bn`` = BatchNorm2d(128, eps 1e-4, affine False) over 2×2 patches)
  loads, with ``strict=True``, what ``klvae-export --format flux2-ae`` writes from klvae's 32-channel network
  with random weights and random BatchNorm statistics. Compared: the mean and logvar halves of its encoder
  moments, its ``encode`` (patchified, normalised mean) against ``bn.normalize``, its raw decoder, and its
  ``decode`` (which undoes the normalisation) against ``bn.denormalize`` then klvae's decode. Then
  ``klvae.load_vae`` reads the file back: the tensors alone must say 32 channels and the BatchNorm.

LDM's ``AutoencoderKL`` module imports ``taming`` (for its VQ model) and ``pytorch_lightning``. klvae's
environment has Lightning 2, under which the class imports and builds; for ``taming`` install::

    pip install --no-deps taming-transformers-rom1504==0.0.6

(the PyPI package ``taming-transformers`` 0.0.1 lacks the ``VectorQuantizer2`` LDM imports). Without it
the script assembles LDM's own ``Encoder``/``Decoder`` (``ldm/modules/diffusionmodules/model.py``), two
``Conv2d`` and ``DiagonalGaussianDistribution`` exactly as LDM's ``AutoencoderKL`` does, and says so.

``--small`` runs a narrower network (ch 32, ch_mult [1, 2, 2, 2], 1 res block; widths stay multiples of
32 because LDM and FLUX.1 hard-code ``GroupNorm(32)``) for a quick check; the default is full size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from klvae import KLAutoencoder, NetworkConfig, load_vae
from klvae.modules.config import LatentBatchNormConfig

CASES = ("ldm-kl-f8", "ldm-c16", "ldm-c16-noquant", "flux", "flux2")
# FLUX.1's published autoencoder (black-forest-labs/flux, src/flux/util.py: ae_params).
FLUX_SCALE_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159
# Non-square on purpose: a transposed height/width anywhere shows up as a shape error or a large difference.
INPUT_SHAPE = (1, 3, 64, 96)
SMALL_NETWORK = {"ch": 32, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 1}
LDM_MODULE = Path("ldm/models/autoencoder.py")
FLUX_MODULE = Path("src/flux/modules/autoencoder.py")
FLUX2_MODULE = Path("src/flux2/autoencoder.py")


@dataclass
class CaseReport:
    """Outcome of one case: max abs differences by name, facts that must hold, and errors."""

    name: str
    diffs: list[tuple[str, float, float]] = field(default_factory=list)  # (what, max |Δ|, max |reference|)
    facts: list[tuple[str, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def compare(self, what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        """Record max |ours - theirs|; a shape mismatch is an error (broadcasting would hide it)."""
        if ours.shape != theirs.shape:
            self.errors.append(f"{what}: klvae shape {tuple(ours.shape)} vs reference {tuple(theirs.shape)}")
            return
        diff = (ours.double() - theirs.double()).abs().max().item()
        self.diffs.append((what, diff, theirs.double().abs().max().item()))

    def passed(self, tol: float) -> bool:
        return not self.errors and all(ok for _, ok in self.facts) and all(d <= tol for _, d, _ in self.diffs)


def random_network(network: NetworkConfig, seed: int) -> KLAutoencoder:
    """A klvae network with random weights, GroupNorm affine included (so a swapped norm cannot hide)."""
    torch.manual_seed(seed)
    model = KLAutoencoder(network)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


def network_config(
    z_channels: int, quant_convs: bool, small: bool, batch_norm: bool = False
) -> NetworkConfig:
    return NetworkConfig(
        z_channels=z_channels,
        embed_dim=z_channels,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
        latent_batch_norm=LatentBatchNormConfig() if batch_norm else None,
        **(SMALL_NETWORK if small else {}),
    )


def sample_input(seed: int) -> torch.Tensor:
    """(1, 3, 64, 96) uniform in [-1, 1]."""
    return torch.rand(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def quiet(build: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run ``build`` with stdout captured (LDM prints a line per attention block); returns its lines too."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = build()
    return result, buffer.getvalue().splitlines()


def klvae_export_command() -> list[str]:
    """The ``klvae-export`` console script of this Python environment."""
    beside = Path(sys.executable).parent / "klvae-export"
    found = str(beside) if beside.is_file() else shutil.which("klvae-export")
    if found is None:
        raise FileNotFoundError("klvae-export is not installed: pip install -e . in the klvae checkout")
    return [found]


def ldm_reference(ddconfig: dict[str, Any], embed_dim: int, ckpt: Path, report: CaseReport) -> Any:
    """LDM's AutoencoderKL loaded from ``ckpt`` (its own ``ckpt_path=`` loader, then strictly)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    try:
        from ldm.models.autoencoder import AutoencoderKL
    except ImportError as e:
        note = (
            f"ldm.models.autoencoder cannot be imported ({e}): LDM's AutoencoderKL class is NOT used; its "
            "Encoder/Decoder, two Conv2d and DiagonalGaussianDistribution are assembled as that class does"
        )
        if note not in report.notes:
            report.notes.append(note)
        model, said = quiet(lambda: LDMModulesAsAutoencoderKL(ddconfig, embed_dim))
    else:
        model, said = quiet(
            lambda: AutoencoderKL(
                ddconfig=ddconfig,
                lossconfig={"target": "torch.nn.Identity"},
                embed_dim=embed_dim,
                ckpt_path=str(ckpt),
            )
        )
        restored = any(line.startswith("Restored from") for line in said)
        report.facts.append((f"LDM's AutoencoderKL(ckpt_path=) restored {ckpt.name}", restored))
    # LDM's init_from_ckpt loads with strict=False; strict here makes a missing or extra key an error.
    model.load_state_dict(state, strict=True)
    report.notes.append(f"{ckpt.name}: {len(state)} tensors loaded into {type(model).__module__}.{type(model).__name__} "
                        "with strict=True")  # fmt: skip
    return model.eval()


class LDMModulesAsAutoencoderKL(torch.nn.Module):
    """Used only when ``ldm.models.autoencoder`` cannot be imported (no ``taming``).

    LDM's own Encoder, Decoder and DiagonalGaussianDistribution, wired as LDM's ``AutoencoderKL`` wires them
    (its ``__init__``, ``encode``, ``decode``): ``quant_conv`` 2·z → 2·embed_dim, ``post_quant_conv``
    embed_dim → z. The state-dict keys are the same four submodules.
    """

    def __init__(self, ddconfig: dict[str, Any], embed_dim: int) -> None:
        from ldm.modules.diffusionmodules.model import Decoder, Encoder
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        super().__init__()
        self.posterior = DiagonalGaussianDistribution
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x: torch.Tensor) -> Any:
        return self.posterior(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def run_ldm_case(
    name: str, z_channels: int, small: bool, workdir: Path, report: CaseReport, quant_convs: bool = True
) -> None:
    network = network_config(z_channels, quant_convs=quant_convs, small=small)
    ours = random_network(network, seed=z_channels)
    x = sample_input(seed=1)
    with torch.no_grad():
        posterior = ours.encode(x)  # mean/logvar (1, z, 8, 12)
        decoded = ours.decode(posterior.mean)  # (1, 3, 64, 96)
    saved = workdir / f"{name}-state.ckpt"
    torch.save({"state_dict": ours.state_dict()}, saved)
    exported = workdir / f"{name}-klvae-export.ckpt"
    command = [*klvae_export_command(), str(saved), "--format", "ldm", "--out", str(exported)]
    if not quant_convs:  # LDM's AutoencoderKL always has them: the export writes exact identity convs
        command.append("--identity-quant-convs")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        report.errors.append(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        return
    files = [("torch.save .ckpt", saved)] if quant_convs else []  # without convs only the export fits LDM
    for label, ckpt in (*files, ("klvae-export .ckpt", exported)):
        theirs = ldm_reference(network.ddconfig(), network.embed_dim, ckpt, report)
        with torch.no_grad():
            their_posterior = theirs.encode(x)
            their_decoded = theirs.decode(posterior.mean)
        report.compare(f"{label}: posterior mean", posterior.mean, their_posterior.mean)
        report.compare(f"{label}: posterior logvar", posterior.logvar, their_posterior.logvar)
        report.compare(f"{label}: decode(mean)", decoded, their_decoded)


def run_flux_case(small: bool, workdir: Path, report: CaseReport) -> None:
    from flux.modules.autoencoder import AutoEncoder, AutoEncoderParams
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    network = network_config(16, quant_convs=False, small=small)
    ours = random_network(network, seed=16)
    x = sample_input(seed=1)
    with torch.no_grad():
        posterior = ours.encode(x)  # (1, 16, 8, 12)
        decoded = ours.decode(posterior.mean)
    path = workdir / "ae.safetensors"
    save_file(
        ours.state_dict(), str(path)
    )  # bare LDM keys, no metadata: the layout of FLUX.1's ae.safetensors
    with safe_open(str(path), framework="pt") as f:
        report.facts.append(("ae.safetensors has no metadata", not f.metadata()))
    params = AutoEncoderParams(
        resolution=256, in_channels=3, ch=network.ch, out_ch=3, ch_mult=list(network.ch_mult),
        num_res_blocks=network.num_res_blocks, z_channels=16, scale_factor=FLUX_SCALE_FACTOR,
        shift_factor=FLUX_SHIFT_FACTOR,
    )  # fmt: skip
    theirs = AutoEncoder(params, sample_z=False)
    state = load_file(str(path))
    theirs.load_state_dict(state, strict=True)
    theirs.eval()
    report.notes.append(f"ae.safetensors: {len(state)} tensors loaded into flux.modules.autoencoder.AutoEncoder "
                        "with strict=True")  # fmt: skip
    with torch.no_grad():
        moments = theirs.encoder(x)  # (1, 32, 8, 12): mean and logvar halves
        their_mean, their_logvar = torch.chunk(moments, 2, dim=1)
        their_latent = theirs.encode(x)  # scale · (mean - shift), sample_z=False
        their_decoded = theirs.decoder(posterior.mean)
        their_decode = theirs.decode(FLUX_SCALE_FACTOR * (posterior.mean - FLUX_SHIFT_FACTOR))
    report.compare("encoder moments: mean half", posterior.mean, their_mean)
    # FLUX never clamps logvar; klvae clamps to [-30, 20] as LDM does, so compare within that range.
    report.compare(
        "encoder moments: logvar half (clamped)", posterior.logvar, their_logvar.clamp(-30.0, 20.0)
    )
    report.compare(
        "AutoEncoder.encode (scaled, shifted mean)",
        FLUX_SCALE_FACTOR * (posterior.mean - FLUX_SHIFT_FACTOR),
        their_latent,
    )
    report.compare("decoder(mean)", decoded, their_decoded)
    report.compare("AutoEncoder.decode(scale·(mean - shift))", decoded, their_decode)

    reloaded = load_vae(path)
    net = reloaded.network
    report.facts.append(("klvae.load_vae(ae.safetensors): use_quant_conv false", net.use_quant_conv is False))
    report.facts.append(
        ("klvae.load_vae(ae.safetensors): use_post_quant_conv false", net.use_post_quant_conv is False)
    )
    report.facts.append(
        (f"klvae.load_vae(ae.safetensors): z_channels 16 (got {net.z_channels})", net.z_channels == 16)
    )
    report.facts.append(
        (f"klvae.load_vae(ae.safetensors): embed_dim 16 (got {net.embed_dim})", net.embed_dim == 16)
    )
    with torch.no_grad():
        report.compare("klvae.load_vae reload: posterior mean", reloaded.encode(x).mean, posterior.mean)
        report.compare("klvae.load_vae reload: decode(mean)", reloaded.decode(posterior.mean), decoded)


def run_flux2_case(small: bool, workdir: Path, report: CaseReport) -> None:
    from flux2.autoencoder import AutoEncoder, AutoEncoderParams
    from safetensors.torch import load_file

    network = network_config(32, quant_convs=True, small=small, batch_norm=True)
    ours = random_network(network, seed=32)
    ours.bn.running_mean.normal_(0.0, 0.5)  # statistics that are not the defaults, so a lost one shows
    ours.bn.running_var.uniform_(0.5, 2.0)
    x = sample_input(seed=1)
    with torch.no_grad():
        posterior = ours.encode(x)  # (1, 32, 8, 12)
        normalised = ours.bn.normalize(posterior.mean)  # (1, 128, 4, 6)
        decoded = ours.decode(posterior.mean)
    saved = workdir / "flux2-state.ckpt"
    torch.save({"state_dict": ours.state_dict()}, saved)  # read back by its tensors alone
    path = workdir / "ae.safetensors"
    command = [*klvae_export_command(), str(saved), "--format", "flux2-ae", "--out", str(path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        report.errors.append(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        return
    params = AutoEncoderParams(
        resolution=256, in_channels=3, ch=network.ch, out_ch=3, ch_mult=list(network.ch_mult),
        num_res_blocks=network.num_res_blocks, z_channels=32,
    )  # fmt: skip
    theirs = AutoEncoder(params)
    state = load_file(str(path))
    theirs.load_state_dict(state, strict=True)
    theirs.eval()
    report.notes.append(f"ae.safetensors: {len(state)} tensors loaded into flux2.autoencoder.AutoEncoder "
                        "with strict=True")  # fmt: skip
    with torch.no_grad():
        moments = theirs.encoder(x)  # (1, 64, 8, 12): its Encoder ends with quant_conv
        their_mean, their_logvar = torch.chunk(moments, 2, dim=1)
        their_latent = theirs.encode(x)  # patchified, normalised mean
        their_decoded = theirs.decoder(posterior.mean)  # its Decoder starts with post_quant_conv
        their_decode = theirs.decode(normalised)
        ours_from_normalised = ours.decode(ours.bn.denormalize(normalised))
    report.compare("encoder moments: mean half", posterior.mean, their_mean)
    report.compare(
        "encoder moments: logvar half (clamped)", posterior.logvar, their_logvar.clamp(-30.0, 20.0)
    )
    report.compare("AutoEncoder.encode (normalised patches)", normalised, their_latent)
    report.compare("decoder(mean)", decoded, their_decoded)
    report.compare("AutoEncoder.decode(normalised patches)", ours_from_normalised, their_decode)

    reloaded = load_vae(path)
    net = reloaded.network
    report.facts.append(
        ("klvae.load_vae(ae.safetensors): quant convs", net.use_quant_conv and net.use_post_quant_conv)
    )
    report.facts.append(
        (f"klvae.load_vae(ae.safetensors): latent BatchNorm {net.latent_batch_norm}",
         net.latent_batch_norm == LatentBatchNormConfig())
    )  # fmt: skip
    with torch.no_grad():
        report.compare(
            "klvae.load_vae reload: normalised mean",
            reloaded.bn.normalize(reloaded.encode(x).mean),
            normalised,
        )


def print_report(report: CaseReport, tol: float) -> None:
    for note in report.notes:
        print(f"  note: {note}")
    for what, diff, scale in report.diffs:
        verdict = "ok" if diff <= tol else "ABOVE TOLERANCE"
        print(f"  {what:<48} max|Δ| {diff:.3e}  (max|reference| {scale:.3g})  {verdict}")
    for what, ok in report.facts:
        print(f"  {what:<48} {'ok' if ok else 'FALSE'}")
    for error in report.errors:
        print(f"  ERROR: {error}")
    print(f"  {report.name}: {'PASS' if report.passed(tol) else 'FAIL'} ({report.seconds:.1f} s)")


def checkout(parser: argparse.ArgumentParser, path: str | None, module: Path, flag: str, repo: str) -> Path:
    if path is None:
        parser.error(f"{flag} is required for the cases asked for: give a checkout of {repo}")
    root = Path(path).expanduser().resolve()
    if not (root / module).is_file():
        parser.error(f"{flag} {path!r} is not a checkout of {repo}: {root / module} does not exist")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ldm-repo", help="checkout of CompVis/latent-diffusion (for the ldm-* cases)")
    parser.add_argument("--flux-repo", help="checkout of black-forest-labs/flux (for the flux case)")
    parser.add_argument("--flux2-repo", help="checkout of black-forest-labs/flux2 (for the flux2 case)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases to run")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest allowed max abs difference")
    parser.add_argument("--small", action="store_true", help="narrow network (ch 32) for a quick check")
    args = parser.parse_args(argv)
    if any(c.startswith("ldm-") for c in args.cases):
        sys.path.insert(
            0, str(checkout(parser, args.ldm_repo, LDM_MODULE, "--ldm-repo", "CompVis/latent-diffusion"))
        )
    if "flux" in args.cases:
        flux_root = checkout(parser, args.flux_repo, FLUX_MODULE, "--flux-repo", "black-forest-labs/flux")
        sys.path.insert(0, str(flux_root / "src"))
    if "flux2" in args.cases:
        flux2_root = checkout(
            parser, args.flux2_repo, FLUX2_MODULE, "--flux2-repo", "black-forest-labs/flux2"
        )
        sys.path.insert(0, str(flux2_root / "src"))

    torch.set_grad_enabled(False)
    size = (
        "small network " + str(SMALL_NETWORK)
        if args.small
        else "full-size network (ch 128, ch_mult (1, 2, 4, 4))"
    )
    print(f"klvae vs reference code: {size}, input {INPUT_SHAPE} float32, tolerance {args.tol:g}")
    reports = []
    with tempfile.TemporaryDirectory(prefix="klvae-reference-") as tmp:
        for case in args.cases:
            report = CaseReport(case)
            print(f"{case}:")
            start = time.perf_counter()
            try:
                if case == "flux":
                    run_flux_case(args.small, Path(tmp), report)
                elif case == "flux2":
                    run_flux2_case(args.small, Path(tmp), report)
                else:
                    channels = 4 if case == "ldm-kl-f8" else 16
                    quant = case != "ldm-c16-noquant"
                    run_ldm_case(case, channels, args.small, Path(tmp), report, quant_convs=quant)
            except Exception as e:  # a strict-load failure is a result to report, not a crash
                report.errors.append(f"{type(e).__name__}: {e}")
            report.seconds = time.perf_counter() - start
            print_report(report, args.tol)
            reports.append(report)
            for leftover in Path(tmp).iterdir():  # full-size files are ~330 MB each
                leftover.unlink()
    failed = [r.name for r in reports if not r.passed(args.tol)]
    print(f"FAIL: {', '.join(failed)}" if failed else f"PASS: {', '.join(r.name for r in reports)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
