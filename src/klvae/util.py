"""Config vocabulary shared with LDM/sgm: ``{target, params}`` blocks and ``instantiate_from_config``.

Objects never see OmegaConf: configs are resolved into plain dicts/lists first, so nothing
``DictConfig``-typed can end up pickled into a checkpoint (it would break ``weights_only`` loading).
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from klvae.errors import ConfigError

__all__ = [
    "get_obj_from_str",
    "instantiate_from_config",
    "load_config",
    "load_yaml_mapping",
    "to_container",
]


def to_container(config: Any) -> Any:
    """Resolve interpolations and return plain Python containers (dict/list/scalars)."""
    if isinstance(config, DictConfig | ListConfig):
        from omegaconf.errors import OmegaConfBaseException

        try:
            return OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as e:  # `???` left unset, a broken ${interpolation}
            key = getattr(e, "full_key", None) or "?"
            detail = str(e).splitlines()[0]
            raise ConfigError(f"config key {key}: {detail}; set it in the YAML or as {key}=VALUE") from None
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
    _check_types(target, obj, signature, params)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits the type hint; None when the hint is too rich to check (then: accept)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        results = [_matches(value, h) for h in typing.get_args(hint)]
        return any(r is None or r for r in results)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # YAML writes 1e-4 as a float but 1 as an int: both are numbers
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    base = origin or hint
    if base in (list, tuple, Sequence, typing.Sequence):
        return isinstance(value, list | tuple)
    if base in (dict, Mapping, typing.Mapping):
        return isinstance(value, Mapping)
    return None


def _check_types(target: str, obj: Any, signature: inspect.Signature, params: Mapping[str, Any]) -> None:
    """A YAML value of the wrong type (``kl_weight: abc``) fails here, naming the parameter, not deep inside."""
    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # unresolvable annotations: nothing to check against
        return
    for name, value in params.items():
        if name not in signature.parameters or name not in hints:
            continue
        if _matches(value, hints[name]) is False:
            raise ConfigError(
                f"{target}: parameter {name!r} must be {_type_name(hints[name])}, got {value!r} "
                f"({type(value).__name__}); fix it in the config's params"
            )


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


def _merge_blocks(base: Any, overlay: Any) -> Any:
    """Merge plain containers: mappings key by key, anything else (lists, scalars) replaced by the overlay.

    A ``{target, params}`` block whose ``target`` changes is replaced whole, not merged: switching
    ``data.target`` from a shard module to a folder module must not keep the shard module's params.
    """
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return overlay
    if "target" in base and "target" in overlay and base["target"] != overlay["target"]:
        return overlay
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = _merge_blocks(base[key], value) if key in base else value
    return merged


def _parse_override_value(item: str, value: str) -> Any:
    """The YAML value of one ``key=value`` override, as OmegaConf's dotlist parser reads it."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={value}"]), resolve=False)["value"]
    except Exception as e:
        raise ConfigError(f"override {item!r}: cannot parse the value {value!r}: {e}") from e


def load_yaml_mapping(path: str | Path, hint: str = "") -> dict[str, Any]:
    """A user's YAML config file as a plain dict (``${...}`` left unresolved); ``{}`` for an empty file.

    Raises:
        ConfigError: the file does not exist, does not parse, or does not hold a mapping; ``hint`` (what
            to do about it) ends the message.
    """
    path = Path(path)
    hint = f"; {hint}" if hint else ""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist{hint}")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as e:  # yaml.YAMLError and friends: point at the file
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}{hint}"
        ) from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}{hint}")
    return loaded


def load_config(
    paths: Sequence[str | Path], overrides: Sequence[str] = (), base: DictConfig | None = None
) -> DictConfig:
    """Load several YAML files merged left to right, then apply ``key.path=value`` dotlist overrides.

    Merging follows OmegaConf's rules (mappings merge, lists are replaced) with one difference: a block
    whose ``target`` differs from the one it lands on replaces it (an overlay that switches the data
    module drops the old module's params). Override keys may index into lists
    (``data.params.train.sources.0.shards=...``); interpolations (``${...}``) stay unresolved.

    Args:
        paths: YAML files, merged left to right.
        overrides: ``key.path=value`` strings, applied last.
        base: a config to start from (a resumed run's saved config), merged under the files.

    Raises:
        ConfigError: a file that does not exist or does not parse; a malformed override or one that
            indexes past the end of a list.
    """
    merged: Any = {} if base is None else OmegaConf.to_container(base, resolve=False)
    for path in paths:
        merged = _merge_blocks(merged, load_yaml_mapping(path))
    config = OmegaConf.create(merged)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        try:
            OmegaConf.update(
                config, key.strip(), _parse_override_value(item, value), merge=True, force_add=True
            )
        except Exception as e:  # an index past a list's end, a key into a scalar, ...
            raise ConfigError(f"cannot apply override {item!r}: {e}".rstrip()) from e
    return config
