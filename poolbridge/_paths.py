"""Child side: the object a dotted path names (``"os.path.join"``), importing what it must."""

from __future__ import annotations

import importlib
from typing import Any

from ._errors import BadRequestError

__all__ = ["resolve_path", "split_path"]


def split_path(path: str) -> tuple[Any, tuple[str, ...]]:
    """Import the longest importable module prefix of a dotted path: ``(module, remaining attrs)``."""
    if not isinstance(path, str) or not path:
        raise BadRequestError(f"expected a dotted path, got {path!r:.80}")
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                raise  # the module exists but one of *its* imports is missing
            continue
        return module, tuple(parts[cut:])
    builtins = importlib.import_module("builtins")
    if not hasattr(builtins, parts[0]):
        raise ModuleNotFoundError(
            f"no module named {parts[0]!r} could be imported for {path!r} (nor is it a builtin)", name=parts[0]
        )
    return builtins, tuple(parts)


def resolve_path(path: str) -> Any:
    """The object a dotted path names, e.g. ``"os.path.join"``."""
    obj, attrs = split_path(path)
    for attr in attrs:
        obj = getattr(obj, attr)
    return obj
