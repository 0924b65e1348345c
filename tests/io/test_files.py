"""The one safe reader and atomic writer of weight files (klvae.io.files)."""

from __future__ import annotations

import pytest
import torch

from klvae.io.files import (
    load_torch_file,
    read_tensor_file,
    save_safetensors,
    save_torch_file,
    write_atomically,
)


def test_reads_checkpoints_bare_dicts_and_safetensors_with_metadata(tmp_path) -> None:
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    ckpt = save_torch_file(tensors, tmp_path / "x.ckpt", {"hyper_parameters": {"embed_dim": 4}})
    read = read_tensor_file(ckpt)
    assert set(read.tensors) == set(tensors) and read.metadata == {"hyper_parameters": {"embed_dim": 4}}
    torch.save(tensors, tmp_path / "bare.pth")
    assert read_tensor_file(tmp_path / "bare.pth").metadata == {}
    st = save_safetensors(tensors, tmp_path / "x.safetensors", {"format": "pt", "info": {"k": [1, 2]}})
    read = read_tensor_file(st)
    assert read.is_safetensors and read.metadata == {"format": "pt", "info": {"k": [1, 2]}}
    assert torch.equal(read.tensors["a.weight"], tensors["a.weight"])
    # torch's legacy (non-zip) format cannot be memory-mapped; it still loads.
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert set(read_tensor_file(tmp_path / "legacy.pt").tensors) == set(tensors)


def test_unreadable_files_are_named_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        read_tensor_file(tmp_path / "absent.ckpt")
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "obj": torch.nn.ReLU()}, evil)
    with pytest.raises(
        ValueError, match=r"evil\.ckpt cannot be loaded with torch\.load\(weights_only=True\)"
    ):
        load_torch_file(evil)
    cut = tmp_path / "cut.safetensors"
    save_safetensors({"a": torch.zeros(100)}, cut)
    cut.write_bytes(cut.read_bytes()[:-50])
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        read_tensor_file(cut)
    torch.save({"a": 1, "b": "text"}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="does not contain a state dict"):
        read_tensor_file(tmp_path / "plain.pt")


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path) -> None:
    target = tmp_path / "vae.safetensors"
    save_safetensors({"a": torch.zeros(2)}, target)
    before = target.read_bytes()

    def crash(tmp):
        tmp.write_bytes(b"half a file")
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        write_atomically(target, crash)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vae.safetensors"]


def test_written_files_get_the_umask_mode_not_0600(tmp_path) -> None:
    # Exports and checkpoints are shared on clusters: the mode is what a plain open() would give.
    import os

    umask = os.umask(0o022)
    try:
        path = save_safetensors({"a": torch.zeros(1)}, tmp_path / "shared.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
