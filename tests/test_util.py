"""Config vocabulary: instantiate_from_config and YAML loading fail loudly, naming the bad key."""

from __future__ import annotations

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from klvae.util import ConfigError, get_obj_from_str, instantiate_from_config, load_config, to_container


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
    from klvae.util import DataError, one_line

    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nklvae.util.DataError: 0 of 5 samples in train source 0 decoded\n'
    )
    assert one_line(wrapped) == "0 of 5 samples in train source 0 decoded"
