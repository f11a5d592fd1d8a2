"""Lazy package attributes (PEP 562): a package's public names load their module on first use, so
``import segformer_fast`` and ``segformer-fast --help`` do not pay for importing torch."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Mapping


class _LazyPackage(types.ModuleType):
    """A package whose exported name may equal a submodule's (``segformer_fast.patch``, the function, in
    ``segformer_fast/patch.py``): when the import system binds the submodule onto the package, the
    package keeps the exported object instead, as an eager ``from .patch import patch`` would."""

    def __setattr__(self, name: str, value) -> None:
        exports = self.__dict__.get("_lazy_exports", {})
        if isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}" \
                and exports.get(name) == f".{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_exports(package: str, namespace: dict, exports: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``name`` lives in the submodule ``exports[name]``.

    Args:
        package: the package's ``__name__``.
        namespace: the package's ``globals()``; a loaded name is stored there, so the lookup runs once.
        exports: public name -> relative module path (e.g. ``{"segformer": ".models"}``).

    Returns:
        The module-level ``__getattr__`` and ``__dir__`` to assign in the package. An attribute that is
        neither exported nor a submodule raises AttributeError, as for any module.

    Example:
        >>> __getattr__, __dir__ = lazy_exports(__name__, globals(), {"train": ".trainer"})
    """

    namespace["_lazy_exports"] = dict(exports)
    sys.modules[package].__class__ = _LazyPackage

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif importlib.util.find_spec(f"{package}.{name}") is not None:  # a submodule: `pkg.ops` without importing it
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
