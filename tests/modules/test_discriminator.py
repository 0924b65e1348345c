"""PatchGAN discriminator: shape, parameter count, and ActNorm's data-dependent init under DDP."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from klvae.modules.discriminator import ActNorm, NLayerDiscriminator


def test_patchgan_shape_and_parameter_count():
    d = NLayerDiscriminator()
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert sum(p.numel() for p in d.parameters()) == 2_765_633


def test_actnorm_initialises_to_zero_mean_unit_std_of_the_first_batch():
    x = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 7
    norm = ActNorm(3)
    y = norm(x)
    flat = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(norm.loc.flatten(), -flat.mean(1))
    torch.testing.assert_close(norm.scale.flatten(), 1 / (flat.std(1) + 1e-6))
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def _rank(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)  # each rank its own first batch
    x = torch.randn(2, 3, 4, 4) * (rank + 1) + rank
    norm = ActNorm(3)
    norm(x)
    out[rank] = (x, norm.loc.detach().clone(), norm.scale.detach().clone())
    dist.destroy_process_group()


def test_actnorm_initialises_from_all_ranks_first_batches():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
    (x0, loc0, scale0), (x1, loc1, scale1) = out[0], out[1]
    assert torch.equal(loc0, loc1) and torch.equal(scale0, scale1)  # identical discriminators
    flat = torch.cat([x0, x1]).transpose(0, 1).reshape(3, -1)  # the statistics of both batches together
    torch.testing.assert_close(loc0.flatten(), -flat.mean(1))
    torch.testing.assert_close(scale0.flatten(), 1 / (flat.std(1) + 1e-6))
