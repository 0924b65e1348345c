"""klvae-encode: several processes, resume after an interruption, bad images, labels, the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import webdataset as wds

from klvae.data.latent_format import INDEX_NAME, LatentIndex, shard_name
from klvae.data.latent_shards import LatentShardDataset
from klvae.diffusability.encode import encode_to_shards, main
from klvae.errors import ConfigError, DataError
from tests.cli_helpers import REPO, subprocess_env


def test_two_processes_write_disjoint_complete_shards(tmp_path, photo_dir, vae_f2) -> None:
    out = tmp_path / "lat"
    cmd = [sys.executable, "-m", "klvae.diffusability.encode", str(vae_f2), "--data", str(photo_dir), "--out",
           str(out), "--resolution", "32", "--samples-per-shard", "1", "--num-workers", "0", "--no-progress"]  # fmt: skip
    env = subprocess_env(tmp_path)
    env["PYTHONPATH"] = f"{REPO / 'src'}{os.pathsep}{env['PYTHONPATH']}"  # this checkout's klvae
    # As torchrun starts them: same command, RANK/WORLD_SIZE/LOCAL_RANK in the environment, no process group.
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)},
                              cwd=REPO, stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    records = {i: json.loads((out / shard_name(i).replace(".tar", ".json")).read_text()) for i in range(6)}
    assert {i: r["rank"] for i, r in records.items()} == {
        i: i % 2 for i in range(6)
    }  # each rank its own shards
    index = LatentIndex.read(out)  # written by whichever process finished last, once all shards existed
    assert index.num_samples == 6 and [s["count"] for s in index.shards] == [1] * 6
    keys = [k for _, k, _ in LatentShardDataset(out).items]
    assert sorted(keys) == sorted(p.stem for p in photo_dir.glob("*.png"))  # complete, no duplicates
    assert not list(out.glob(".*.tmp"))


def test_interrupted_encode_resumes_without_reencoding_finished_shards(tmp_path, photo_dir, vae_f2) -> None:
    out = tmp_path / "lat"
    args = dict(resolution=32, batch_size=2, samples_per_shard=2, num_workers=0, progress=False)

    def crash_after_first(index: int) -> None:
        raise KeyboardInterrupt  # as Ctrl-C or a kill right after shard 0 reached the disk

    with pytest.raises(KeyboardInterrupt):
        encode_to_shards(str(vae_f2), str(photo_dir), out, on_shard_written=crash_after_first, **args)
    assert (out / shard_name(0)).is_file() and not (out / shard_name(1)).exists()
    assert not list(out.glob(".*.tmp")) and not (out / INDEX_NAME).exists()
    with pytest.raises(DataError, match="has not finished"):
        LatentIndex.read(out)
    first = (out / shard_name(0)).stat().st_mtime_ns
    result = encode_to_shards(str(vae_f2), str(photo_dir), out, **args)
    assert result.shards_already_done == [0] and result.shards_written == [1, 2]
    assert (out / shard_name(0)).stat().st_mtime_ns == first  # not rewritten
    assert LatentIndex.read(out).num_samples == 6
    with pytest.raises(
        ConfigError, match="resolution=32"
    ):  # a resume with other settings would mix encodings
        encode_to_shards(str(vae_f2), str(photo_dir), out, **{**args, "resolution": 16})


def test_bad_images_are_skipped_counted_and_named(tmp_path, photo_dir, vae_f2) -> None:
    data = tmp_path / "imgs"
    data.mkdir()
    for p in photo_dir.glob("*.png"):
        (data / p.name).write_bytes(p.read_bytes())
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "tiny.png").write_bytes((photo_dir / "astronaut.png").read_bytes()[:200])  # truncated
    encode_to_shards(str(vae_f2), str(data), tmp_path / "lat", resolution=32, num_workers=0, progress=False)
    index = LatentIndex.read(tmp_path / "lat")
    assert index.num_samples == 6 and index.record["num_skipped"] == 2
    assert index.record["skipped"] == {"corrupt_image": 2}
    assert {e["source"].rsplit("/", 1)[1] for e in index.record["skipped_examples"]} == {
        "broken.png",
        "tiny.png",
    }


def test_shards_with_cls_labels_become_a_labelled_latent_set(tmp_path, photo_dir, vae_f2) -> None:
    shard = tmp_path / "in-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, p in enumerate(sorted(photo_dir.glob("*.png"))):
            sink.write({"__key__": f"s{i:03d}", "png": p.read_bytes(), "cls": str(i % 3).encode()})
    out = tmp_path / "lat"
    encode_to_shards(str(vae_f2), str(shard), out, resolution=32, num_workers=0, progress=False)
    index = LatentIndex.read(out)
    assert index.classes == ["0", "1", "2"] and index.num_samples == 6
    data = LatentShardDataset(out)
    assert sorted(data[i]["label"] for i in range(len(data))) == [0, 0, 1, 1, 2, 2]
    assert json.loads((out / shard_name(0).replace(".tar", ".json")).read_text())["max_label"] == 2


def test_bf16_encoding_is_close_to_fp32(tmp_path, photo_dir, vae_f2) -> None:
    for precision in ("fp32", "bf16"):
        encode_to_shards(str(vae_f2), str(photo_dir), tmp_path / precision, resolution=32, precision=precision,
                         storage_dtype="float16" if precision == "bf16" else "float32", num_workers=0,
                         progress=False)  # fmt: skip
    a = LatentShardDataset(tmp_path / "fp32", sample_posterior=False, latent_norm="none", flip=False)
    b = LatentShardDataset(tmp_path / "bf16", sample_posterior=False, latent_norm="none", flip=False)
    x, y = a[0]["latent"], b[0]["latent"]
    assert (x - y).abs().max() < 0.05 * x.abs().max() and not (x == y).all()


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys, photo_dir, vae_f2) -> None:
    assert main([str(vae_f2), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert main([str(tmp_path / "nope.ckpt"), "--data", str(photo_dir), "--out", str(tmp_path / "o")]) == 2
    assert (
        main([str(vae_f2), "--data", str(photo_dir), "--out", str(tmp_path / "o"), "--resolution", "33"]) == 2
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("klvae-encode: error:")]
    assert len(lines) == 3 and "multiple of" in lines[2], lines


def test_importing_the_tools_does_not_import_diffusers() -> None:
    code = ("import sys, klvae, klvae.data, klvae.diffusability, klvae.diffusability.encode, klvae.data.latent_shards, "
            "klvae.diffusability.train; print('diffusers' in sys.modules)")  # fmt: skip
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
