"""image_batches(select=...): a subset chosen by key, the others never decoded."""

from __future__ import annotations

import webdataset as wds

from klvae.evaluation.data import image_batches
from tests.cli_helpers import write_photos


def test_select_keeps_only_the_accepted_keys_in_folders_and_shards(tmp_path) -> None:
    folder = write_photos(tmp_path / "photos", n=6, size=32)
    keys = [k for _, ks in image_batches(str(folder), 32, 4, select=lambda k: k < "co") for k in ks]
    assert keys == sorted(p.stem for p in folder.glob("*.png") if p.stem < "co")
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        for p in sorted(folder.glob("*.png")):
            sink.write({"__key__": p.stem, "png": p.read_bytes()})
    kept = [
        k
        for _, ks in image_batches(str(tmp_path / "s.tar"), 32, 4, select=lambda k: k.endswith("t"))
        for k in ks
    ]
    assert kept and all(k.startswith("s.tar:") and k.endswith("t") for k in kept)
