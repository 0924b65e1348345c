"""Lazy package exports (PEP 562), so ``import klvae`` or ``import klvae.data`` imports nothing heavy.

A package lists which of its submodules defines each public name; the submodule is imported on first
attribute access. Keeps ``klvae.inference`` free of Lightning and lpips, and the CLIs quick to start.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, exporting ``{name: "module.path"}`` on first access.

    Example (in ``klvae/data/__init__.py``)::

        __getattr__, __dir__ = lazy_exports(__name__, {"WebDataModule": "klvae.data.webdataset_module"})
    """
    table = dict(exports)

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(table[name]), name)

    def __dir__() -> list[str]:
        return sorted(set(table) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
