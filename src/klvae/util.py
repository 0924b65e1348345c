"""Config vocabulary shared with LDM/sgm: ``{target, params}`` blocks and ``instantiate_from_config``.

Objects never see OmegaConf: configs are resolved into plain dicts/lists first, so nothing
``DictConfig``-typed can end up pickled into a checkpoint (it would break ``weights_only`` loading).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "ConfigError",
    "get_obj_from_str",
    "instantiate_from_config",
    "load_config",
    "to_container",
]


class ConfigError(ValueError):
    """A config that cannot be turned into objects; the message names the offending key or value."""


def to_container(config: Any) -> Any:
    """Resolve interpolations and return plain Python containers (dict/list/scalars)."""
    if isinstance(config, DictConfig | ListConfig):
        return OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    if isinstance(config, Mapping):
        return {k: to_container(v) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return [to_container(v) for v in config]
    return config


def get_obj_from_str(path: str) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``, with an error that says what failed."""
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(
            f"target must be a dotted import path like 'klvae.models.AutoencoderKL', got {path!r}"
        )
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"target {path!r}: cannot import module {module_name!r} ({e})") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"target {path!r}: module {module_name!r} has no attribute {attr!r}") from None


def _check_arguments(target: str, obj: Any, params: Mapping[str, Any]) -> None:
    """Fail on unknown or missing constructor arguments before calling, naming them."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: let the call itself complain
        return
    accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    names = {
        n
        for n, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"
    }
    unknown = sorted(set(params) - names)
    if unknown and not accepts_var_kw:
        raise ConfigError(
            f"{target}: unknown parameter(s) {unknown} in params; accepted parameters are {sorted(names)}"
        )
    missing = sorted(
        n
        for n, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is p.empty
        and n != "self"
        and n not in params
    )
    if missing:
        raise ConfigError(f"{target}: missing required parameter(s) {missing} in params")


def instantiate_from_config(config: Mapping[str, Any] | DictConfig, **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from a ``{target: ..., params: {...}}`` block.

    Args:
        config: mapping with a ``target`` import path and optional ``params``. OmegaConf nodes are
            converted to plain containers first.
        **extra: arguments supplied by code rather than YAML (they win over ``params``).

    Raises:
        ConfigError: no ``target``; the target cannot be imported; an unknown or missing parameter.
    """
    config = to_container(config)
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"expected a mapping with 'target' and 'params', got {type(config).__name__}: {config!r}"
        )
    if "target" not in config:
        raise ConfigError(
            f"config block has no 'target' key (keys: {sorted(config)}); expected {{target, params}}"
        )
    unexpected = sorted(set(config) - {"target", "params", "base_learning_rate"})
    if unexpected:
        raise ConfigError(f"config block for {config['target']!r} has unknown key(s) {unexpected}")
    target = config["target"]
    params = dict(config.get("params") or {})
    params.update(extra)
    obj = get_obj_from_str(target)
    _check_arguments(target, obj, params)
    return obj(**params)


def load_config(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> DictConfig:
    """Load several YAML files merged left to right, then apply ``key.path=value`` dotlist overrides.

    Raises:
        ConfigError: a file that does not exist or does not parse; a malformed override.
    """
    configs = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            configs.append(OmegaConf.load(path))
        except Exception as e:  # yaml.YAMLError and friends: point at the file
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
    try:
        configs.append(OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}") from e
    return OmegaConf.merge(*configs) if configs else OmegaConf.create()
