"""Latent shards back to batches: the round trip to InferenceVAE, normalisation, draws, exact resume."""

from __future__ import annotations

import pytest
import torch

from klvae.data.latent_format import LatentIndex
from klvae.data.latent_shards import LatentShardDataModule, LatentShardDataset, in_validation_split
from klvae.diffusability.encode import encode_to_shards
from klvae.errors import DataError
from klvae.evaluation.data import image_batches
from klvae.inference import InferenceVAE
from tests.diffusability.conftest import photo_dir, vae_f2  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def latents(tmp_path_factory, photo_dir, vae_f2):  # noqa: F811
    out = tmp_path_factory.mktemp("latents") / "f2"
    encode_to_shards(str(vae_f2), str(photo_dir), out, resolution=32, batch_size=4, samples_per_shard=4,
                     flip=True, num_workers=0, progress=False)  # fmt: skip
    return out


def test_encode_then_datamodule_then_decode_equals_inference_vae(latents, photo_dir, vae_f2) -> None:  # noqa: F811
    vae = InferenceVAE.from_pretrained(vae_f2)
    x, keys = next(iter(image_batches(str(photo_dir), 32, batch_size=16)))  # the same pixels klvae-eval sees
    dm = LatentShardDataModule(str(latents), batch_size=2, num_workers=0, sample_posterior=False, flip=False,
                               latent_norm="none")  # fmt: skip
    dm.setup()
    by_key = {item["__key__"]: item["latent"] for item in (dm.train_set[i] for i in range(len(dm.train_set)))}
    assert len(by_key) == len(keys) == 6
    stored = torch.stack([by_key[k.replace(".", "_")] for k in keys])  # (6, 4, 16, 16)
    torch.testing.assert_close(stored, vae.encode(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(vae.decode(stored), vae.decode(vae.encode(x)), rtol=0, atol=1e-5)
    # The flipped copy is the encoding of the flipped image (LightningDiT's extract_features), not a flipped
    # latent; training draws either with probability 1/2.
    flipped = LatentShardDataset(latents, sample_posterior=False, flip=True, latent_norm="none")
    i = next(j for j, (_, key, _) in enumerate(flipped.items) if key == keys[0].replace(".", "_"))
    draws = [flipped[(epoch, i)]["latent"] for epoch in range(16)]
    original, mirrored = vae.encode(x[:1])[0], vae.encode(x[:1].flip(-1))[0]
    assert not torch.allclose(mirrored, original.flip(-1), atol=1e-3)
    assert all(
        torch.allclose(d, original, atol=1e-5) or torch.allclose(d, mirrored, atol=1e-5) for d in draws
    )
    assert any(torch.allclose(d, mirrored, atol=1e-5) for d in draws)
    assert any(torch.allclose(d, original, atol=1e-5) for d in draws)


def test_training_batches_are_normalised_posterior_draws(latents) -> None:
    index = LatentIndex.read(latents)
    means = LatentShardDataset(latents, sample_posterior=False, flip=False, latent_norm="none")
    normed = LatentShardDataset(latents, sample_posterior=False, flip=False, latent_norm="global")
    scale, shift = index.stats["scaling_factor"], index.stats["shift_factor"]
    torch.testing.assert_close(normed[0]["latent"], (means[0]["latent"] - shift) * scale)
    draws = LatentShardDataset(latents, sample_posterior=True, flip=False, latent_norm="none")
    assert torch.equal(draws[(0, 1)]["latent"], draws[(0, 1)]["latent"])  # a function of (seed, epoch, index)
    assert not torch.equal(draws[(0, 1)]["latent"], draws[(1, 1)]["latent"])
    assert not torch.equal(draws[(0, 1)]["latent"], means[1]["latent"])


def test_loader_resumes_mid_epoch_with_the_same_batches(latents) -> None:
    def keys(loader) -> list[list[str]]:
        return [b["__key__"] for b in loader]

    dm = LatentShardDataModule(str(latents), batch_size=2, num_workers=0)
    full = keys(dm.train_dataloader())
    assert len(full) == 3 and len({k for b in full for k in b}) == 6
    resumed = LatentShardDataModule(str(latents), batch_size=2, num_workers=0).train_dataloader()
    resumed.load_state_dict({"epoch": 0, "batches": 1})
    assert keys(resumed) == full[1:]


def test_validation_split_is_by_key_and_disjoint(latents) -> None:
    train = LatentShardDataset(latents, "train", 0.5)
    val = LatentShardDataset(latents, "val", 0.5)
    train_keys, val_keys = {k for _, k, _ in train.items}, {k for _, k, _ in val.items}
    assert train_keys.isdisjoint(val_keys) and len(train_keys | val_keys) == 6
    assert all(in_validation_split(k, 0.5) for k in val_keys)


def test_a_directory_without_index_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match="not a latent directory"):
        LatentShardDataModule(str(tmp_path)).setup()
