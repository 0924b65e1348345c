"""Config vocabulary shared with LDM/sgm: ``{target, params}`` blocks and ``instantiate_from_config``.

Objects never see OmegaConf: configs are resolved into plain dicts/lists first, so nothing
``DictConfig``-typed can end up pickled into a checkpoint (it would break ``weights_only`` loading).
"""

from __future__ import annotations

import errno
import importlib
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "DISK_ERRNOS",
    "ConfigError",
    "DataError",
    "TrainingDivergedError",
    "is_user_error",
    "load_user_file",
    "one_line",
    "run_tool",
    "get_obj_from_str",
    "instantiate_from_config",
    "load_config",
    "to_container",
]


class ConfigError(ValueError):
    """A config that cannot be turned into objects; the message names the offending key or value."""


class TrainingDivergedError(RuntimeError):
    """Training cannot go on for a reason the user fixes in the recipe (e.g. updates that keep producing
    non-finite losses); the message names the iteration and what to change."""


class DataError(ValueError):
    """Training or evaluation data that cannot be used (nothing decodes, a source is empty, ...).

    Raised inside DataLoader workers too: PyTorch re-raises it in the main process as ``DataError(text)``
    with the worker's traceback in ``text``, so the constructor takes exactly one string.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)


# Disk and permission failures of the user's file system: full disk, quota, read-only mount, no permission.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_user_error(e: BaseException) -> bool:
    """True for errors the user fixes (config, data, files, disk), False for bugs (which keep tracebacks).

    ``KeyError``/``TypeError``/``AttributeError`` are never user errors here: config problems raise
    :class:`ConfigError` where the value is read, so those only come from code.
    """
    if isinstance(e, ConfigError | DataError | TrainingDivergedError):
        return True
    if isinstance(e, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError):
        return True
    return isinstance(e, OSError) and e.errno in DISK_ERRNOS


def one_line(e: BaseException) -> str:
    """The error as one line; for an error re-raised from a DataLoader worker, the worker's own message."""
    text = str(e)
    if (
        "Original Traceback" in text
    ):  # "Caught DataError in DataLoader worker process 0. Original Traceback..."
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS and e.filename:
        hint = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free quota"}.get(
            e.errno, "choose a writable location (e.g. another --logdir / --out)"
        )
        text = f"cannot write {e.filename!s}: {e.strerror}; {hint}"
    elif isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        text = f"{e}; free disk space or choose a writable location"
    return " ".join(text.split()) or type(e).__name__


def load_user_file(what: str, loader: Callable[[], Any]) -> Any:
    """Call ``loader`` (reading a user-given checkpoint or file); its ValueError becomes a ConfigError.

    Loading code rejects unreadable, truncated or wrong-format files with ValueError naming the file.
    """
    try:
        return loader()
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{what}: {e}") from e


def run_tool(prog: str, body: Callable[[], Any], traceback: bool) -> int:
    """Run a command-line tool's ``body``: user errors become one ``prog: error: ...`` line and status 2.

    With ``traceback`` (the tools' ``--traceback`` flag) they propagate with the full trace instead.
    Bugs (anything :func:`is_user_error` rejects) always keep their traceback.
    """
    try:
        body()
    except Exception as e:
        if traceback or not is_user_error(e):
            raise
        logging.getLogger(__name__).debug("user error", exc_info=True)
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


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
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        except Exception as e:  # yaml.YAMLError and friends: point at the file
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        merged = _merge_blocks(merged, loaded)
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
