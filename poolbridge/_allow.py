"""Child side: the ``--allow-module`` allow-list, enforced where the objects are (in the worker).

The Port server passes its patterns to every worker; the worker checks each step of every dotted
path and every attribute op against them *while resolving*, on the real objects — a string check
in the router could not know that ``mymod.os`` is the module ``os`` or that ``mymod.getpid`` is
``posix.getpid``. The rules (docs/protocol.md, "Allow-list"):

* a *module name* is allowed when it, or one of its dotted prefixes, matches a pattern
  (``fnmatch``); a pattern ``a.*`` also allows ``a`` itself;
* a dotted path imports only allowed module names (an unallowed module is never imported), and
  every attribute step must be a public name (no ``_`` prefix) whose value passes :meth:`check_obj`;
* an attribute op on a ref (``getattr``/``setattr``/``method``), a helper name and a ``kwargs``
  key must be public names, and a few public names that lead to frames and code are refused;
* :meth:`check_obj`: a module must be allowed (by name, or be the module object an allowed name
  imported: ``os.path`` is ``posixpath``); a callable (function, class, method, callable object)
  must be *defined* in an allowed module (its ``__module__``), where ``_x`` counts as ``x`` (the C
  accelerator convention: ``operator.add`` is ``_operator.add``); frames, code objects and
  tracebacks are always refused.
"""

from __future__ import annotations

import fnmatch
import importlib
import sys
import types
from collections.abc import Iterable
from typing import Any

from ._errors import BadRequestError, NotAllowedError

__all__ = ["AllowList"]

#: Public attribute names that lead to frames, code objects or a function's globals.
FRAME_NAMES = frozenset({
    "gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code", "tb_frame", "tb_next",
    "f_back", "f_builtins", "f_code", "f_globals", "f_locals", "func_globals", "func_code",
})
_REFUSED_TYPES = (types.FrameType, types.CodeType, types.TracebackType)


class AllowList:
    """The allow-list of one worker: ``patterns`` as given to ``--allow-module``."""

    def __init__(self, patterns: Iterable[str]) -> None:
        pats: list[str] = []
        for p in patterns:
            pats.append(p)
            if p.endswith(".*"):
                pats.append(p[:-2])  # "a.*" allows everything under a, and a itself
        self.patterns = tuple(pats)
        self._names: dict[str, bool] = {}
        self._modules: set[int] = set()  # ids of module objects imported through an allowed name
        self._module_names: set[str] = set()  # their __name__ (os.path -> "posixpath")

    # -- names -------------------------------------------------------------------------------

    def module_allowed(self, name: str) -> bool:
        hit = self._names.get(name)
        if hit is None:
            parts = name.split(".")
            hit = any(
                fnmatch.fnmatchcase(".".join(parts[:i]), pat) for i in range(1, len(parts) + 1) for pat in self.patterns
            )
            if len(self._names) < 4096:
                self._names[name] = hit
        return hit

    def _owner_allowed(self, owner: str) -> bool:
        if owner in self._module_names or self.module_allowed(owner):
            return True
        head, _, tail = owner.rpartition(".")
        if tail.startswith("_") and tail.strip("_"):  # _operator -> operator, pkg._speedups -> pkg.speedups
            return self.module_allowed(f"{head}.{tail.lstrip('_')}" if head else tail.lstrip("_"))
        return owner in ("posix", "nt") and self.module_allowed("os")  # os re-exports posix/nt

    @staticmethod
    def check_name(name: str, what: str = "attribute") -> None:
        """A public attribute name: no ``_`` prefix, not one that leads to frames or code."""
        if name.startswith("_"):
            raise NotAllowedError(f"{what} {name!r} refused: names starting with '_' are not allowed")
        if name in FRAME_NAMES:
            raise NotAllowedError(f"{what} {name!r} refused: it leads to frames or code objects")

    def check_kwargs(self, kwargs: dict[str, Any]) -> None:
        for key in kwargs:
            self.check_name(key, "keyword argument")

    # -- objects -----------------------------------------------------------------------------

    def check_obj(self, obj: Any, segment: str) -> Any:
        """``obj`` (reached as ``segment``) if it may be used under this allow-list."""
        if isinstance(obj, types.ModuleType):
            if id(obj) in self._modules or self.module_allowed(obj.__name__):
                return obj
            raise NotAllowedError(f"{segment!r} refused: it is the module {obj.__name__!r}, not in the allow-list")
        if isinstance(obj, _REFUSED_TYPES):
            raise NotAllowedError(f"{segment!r} refused: frames, code objects and tracebacks are never handed out")
        if callable(obj):
            try:
                owner = getattr(obj, "__module__", None)
            except Exception:
                owner = None
            if type(owner) is str and not self._owner_allowed(owner):
                raise NotAllowedError(f"{segment!r} refused: it is defined in {owner!r}, not in the allow-list")
        return obj

    def getattr(self, obj: Any, name: str) -> Any:
        """``getattr(obj, name)`` for an attribute op on a ref: the target, the name and the result
        are checked (a ref to a module outside the allow-list, returned by an allowed call, gives
        nothing)."""
        self.check_name(name)
        self.check_obj(obj, "the target ref")
        return self.check_obj(getattr(obj, name), name)

    # -- dotted paths ------------------------------------------------------------------------

    def split(self, path: str) -> tuple[Any, tuple[str, ...]]:
        """The module (imported only if allowed) and the attribute names of a dotted path."""
        parts = path.split(".")
        for part in parts:
            if not part:
                raise BadRequestError(f"malformed dotted path {path!r:.80}")
            self.check_name(part, "path segment")
        for cut in range(len(parts), 0, -1):
            name = ".".join(parts[:cut])
            if not self.module_allowed(name):
                continue
            module = sys.modules.get(name)
            if module is None:
                try:
                    module = importlib.import_module(name)
                except ModuleNotFoundError as exc:
                    if exc.name is not None and not name.startswith(exc.name):
                        raise
                    continue
            self._modules.add(id(module))
            self._module_names.add(module.__name__)
            return module, tuple(parts[cut:])
        raise NotAllowedError(f"{parts[0]!r} refused: no module of {path!r:.80} is in the allow-list")

    def walk(self, module: Any, attrs: tuple[str, ...]) -> Any:
        obj = module
        for attr in attrs:
            obj = self.check_obj(getattr(obj, attr), attr)
        return obj
