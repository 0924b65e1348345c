"""benchmarks/flops.py: FLOPs counted by FlopCounterMode equal the ones derived from the config by hand."""

from __future__ import annotations

import torch

from benchmarks.flops import analytic_codec_flops, analytic_vgg_lpips_flops, count_module_flops
from klvae.modules.perceptual import load_lpips
from klvae.modules.vae import KL_F8_DDCONFIG, KLAutoencoder


def test_counted_flops_match_analytic_and_round_figures_for_kl_f8():
    with torch.device("meta"):
        vae = KLAutoencoder.from_ddconfig(KL_F8_DDCONFIG, 4)
        enc = count_module_flops(lambda x: vae.quant_conv(vae.encoder(x)), torch.empty(1, 3, 256, 256))
        dec = count_module_flops(vae.decode, torch.empty(1, 4, 32, 32))
    analytic = analytic_codec_flops(vae.network, 256, 256)
    assert enc == analytic["encoder"] and dec == analytic["decoder"]
    # LDM kl-f8 at 256²: ≈ 273 and 622 GFLOP (the figures README.md cites)
    assert abs(enc / 273e9 - 1) < 0.01 and abs(dec / 622e9 - 1) < 0.01


def test_analytic_flops_of_the_16_channel_network_without_quant_convs():
    with torch.device("meta"):
        vae = KLAutoencoder.from_ddconfig(
            {"z_channels": 16}, 16, use_quant_conv=False, use_post_quant_conv=False
        )
        enc = count_module_flops(lambda x: vae.encode(x).parameters, torch.empty(1, 3, 256, 256))
        dec = count_module_flops(vae.decode, torch.empty(1, 16, 32, 32))
    assert vae.network.ddconfig() == {**KL_F8_DDCONFIG, "z_channels": 16}
    analytic = analytic_codec_flops(vae.network, 256, 256)
    assert (enc, dec) == (analytic["encoder"], analytic["decoder"])


def test_counted_lpips_pair_flops_match_analytic_and_round_figure():
    meta = load_lpips("random").to("meta")
    x = torch.empty(1, 3, 256, 256, device="meta")
    counted = count_module_flops(meta, x, x)
    assert counted == analytic_vgg_lpips_flops(256, 256)
    assert abs(counted / 80e9 - 1) < 0.01
