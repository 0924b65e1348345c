"""Config vocabulary: instantiate_from_config and YAML loading fail loudly, naming the bad key."""

from __future__ import annotations

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from klvae.errors import ConfigError
from klvae.util import get_obj_from_str, instantiate_from_config, load_config, to_container


def test_instantiate_builds_target_with_params():
    layer = instantiate_from_config(
        {"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}}
    )
    assert isinstance(layer, torch.nn.Linear) and layer.out_features == 2


class Recorder:
    def __init__(self, options: dict, sizes: list) -> None:
        self.options, self.sizes = options, sizes


def test_instantiate_hands_plain_resolved_containers_to_objects():
    cfg = OmegaConf.create(
        {
            "x": 2,
            "block": {
                "target": "tests.test_util.Recorder",
                "params": {"options": {"a": "${x}"}, "sizes": [1]},
            },
        }
    )
    obj = instantiate_from_config(cfg.block)
    assert type(obj.options) is dict and type(obj.sizes) is list
    assert obj.options == {"a": 2}
    assert to_container(cfg)["block"]["params"]["options"] == {"a": 2}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"params": {}}, "no 'target'"),
        ({"target": "torch.nn.NoSuchLayer"}, "NoSuchLayer"),
        ({"target": "no_such_package.Thing"}, "no_such_package"),
        ({"target": "Linear"}, "dotted import path"),
        ({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_featurs": 2}}, "out_featurs"),
        ({"target": "torch.nn.Linear", "params": {"in_features": 3}}, "out_features"),
        ({"target": "torch.nn.Linear", "parms": {}}, "parms"),
    ],
)
def test_instantiate_errors_name_the_problem(config, message):
    with pytest.raises(ConfigError, match=message):
        instantiate_from_config(config)


def test_get_obj_from_str_returns_attribute():
    assert get_obj_from_str("torch.nn.Linear") is torch.nn.Linear


def test_load_config_merges_left_to_right_then_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  lr: 1.0\n  keep: yes\ndata:\n  batch_size: 4\n")
    (tmp_path / "b.yaml").write_text("model:\n  lr: 2.0\n")
    cfg = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"], ["data.batch_size=8", "model.new=3"])
    assert isinstance(cfg, DictConfig)
    assert cfg.model.lr == 2.0 and cfg.model.keep is True and cfg.data.batch_size == 8 and cfg.model.new == 3


def test_load_config_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config([tmp_path / "nope.yaml"])


def test_load_config_invalid_yaml_names_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config([tmp_path / "bad.yaml"])


def test_malformed_override_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="model.lr"):
        load_config([], ["model.lr"])


def test_override_indexes_into_a_list_of_sources(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "data:\n  params:\n    train:\n      sources:\n        - {shards: /old/a.tar, weight: 1.0}\n"
        "        - {shards: /old/b.tar, weight: 2.0}\n"
    )
    cfg = load_config(
        [tmp_path / "a.yaml"], ["data.params.train.sources.1.shards=/data/oi/train-{000000..004095}.tar"]
    )
    sources = to_container(cfg)["data"]["params"]["train"]["sources"]
    assert sources == [
        {"shards": "/old/a.tar", "weight": 1.0},
        {"shards": "/data/oi/train-{000000..004095}.tar", "weight": 2.0},
    ]


def test_override_past_the_end_of_a_list_names_it(tmp_path):
    (tmp_path / "a.yaml").write_text("data:\n  sources:\n    - {shards: a}\n")
    with pytest.raises(ConfigError, match=r"data.sources.3.shards=b"):
        load_config([tmp_path / "a.yaml"], ["data.sources.3.shards=b"])


def test_override_values_are_typed_and_interpolations_kept(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\nmodel:\n  lr: 0.1\n")
    cfg = load_config([tmp_path / "a.yaml"], ["model.lr=3e-4", "model.sizes=[1,2]", "model.ref=${x}"])
    assert cfg.model.lr == 3e-4 and list(cfg.model.sizes) == [1, 2] and cfg.model.ref == 1
    assert OmegaConf.to_container(cfg, resolve=False)["model"]["ref"] == "${x}"


def test_overlay_with_another_target_replaces_the_block(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "data:\n  target: klvae.data.WebDataModule\n  params:\n    train: {shards: a.tar, epoch_length: 10}\n"
        "    size: 256\nmodel:\n  params: {embed_dim: 4}\n"
    )
    (tmp_path / "folder.yaml").write_text(
        "data:\n  target: klvae.data.folder.ImageFolderDataModule\n  params:\n    train_dir: /imgs\n"
        "model:\n  params: {ema_decay: 0.999}\n"
    )
    cfg = to_container(load_config([tmp_path / "base.yaml", tmp_path / "folder.yaml"]))
    assert cfg["data"] == {
        "target": "klvae.data.folder.ImageFolderDataModule",
        "params": {"train_dir": "/imgs"},
    }
    assert cfg["model"]["params"] == {"embed_dim": 4, "ema_decay": 0.999}  # same (no) target: merged


def test_overlay_with_the_same_target_merges(tmp_path):
    (tmp_path / "a.yaml").write_text("data:\n  target: m.A\n  params: {size: 256, batch_size: 12}\n")
    (tmp_path / "b.yaml").write_text("data:\n  target: m.A\n  params: {batch_size: 4}\n")
    cfg = to_container(load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"]))
    assert cfg["data"]["params"] == {"size": 256, "batch_size": 4}


def test_overrides_apply_on_top_of_a_base_config(tmp_path):
    """A resumed run: its saved config is the base, so overrides may index its lists."""
    saved = OmegaConf.create({"data": {"params": {"train": {"sources": [{"shards": "a.tar"}]}}}, "x": 1})
    cfg = load_config([], ["data.params.train.sources.0.shards=b.tar", "x=2"], base=saved)
    assert to_container(cfg) == {"data": {"params": {"train": {"sources": [{"shards": "b.tar"}]}}}, "x": 2}


class Typed:
    def __init__(self, rate: float, steps: int, name: str = "x", flag: bool = False,
                 sizes: list | None = None, maybe: int | None = None) -> None:  # fmt: skip
        self.rate, self.steps = rate, steps


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"rate": "abc", "steps": 1}, "parameter 'rate' must be float, got 'abc' (str)"),
        ({"rate": 1.0, "steps": 1.5}, "parameter 'steps' must be int, got 1.5"),
        ({"rate": 1.0, "steps": True}, "parameter 'steps' must be int, got True"),
        ({"rate": 1.0, "steps": 1, "flag": "yes"}, "parameter 'flag' must be bool"),
        ({"rate": 1.0, "steps": 1, "sizes": 3}, "parameter 'sizes'"),
        ({"rate": 1.0, "steps": 1, "maybe": "2"}, "parameter 'maybe'"),
    ],
)
def test_instantiate_checks_yaml_values_against_type_hints(params, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        instantiate_from_config({"target": "tests.test_util.Typed", "params": params})


def test_instantiate_accepts_ints_for_floats_and_none_for_optionals():
    obj = instantiate_from_config(
        {"target": "tests.test_util.Typed", "params": {"rate": 1, "steps": 2, "maybe": None, "sizes": [1]}}
    )
    assert obj.rate == 1 and obj.steps == 2


def test_one_line_unwraps_errors_from_loader_workers():
    from klvae.errors import DataError, one_line

    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nklvae.errors.DataError: 0 of 5 samples in train source 0 decoded\n'
    )
    assert one_line(wrapped) == "0 of 5 samples in train source 0 decoded"


def test_a_target_in_a_module_that_does_not_exist_is_named():
    with pytest.raises(
        ConfigError, match=r"target 'klvae\.loggers\.X': cannot import module 'klvae\.loggers'"
    ):
        get_obj_from_str("klvae.loggers.X")
