"""A module whose attributes are computed in the worker (module-level ``__getattr__``), so that
``pool.getattr("pb_attrmod.session_info")`` reports the session of the getattr operation itself."""

from __future__ import annotations

from typing import Any

COUNTER = 0


def bump() -> int:
    global COUNTER
    COUNTER += 1
    return COUNTER


def __getattr__(name: str) -> Any:
    if name == "session_info":
        import pb_testmods

        return pb_testmods.whoami()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
