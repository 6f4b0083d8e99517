"""Functions the Port server tests call by dotted path in workers (tests/ is on the servers' path)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from json import dumps  # noqa: F401 - a function of another module, re-exported: refused under an allow-list
from typing import Any

from pb_testmods import wait_for_path as wait_for

getpid = os.getpid  # the same, from posix (through os)
sub = os  # a module attribute: refused unless `os` is allowed


def _private() -> str:
    return "private"


def imported(name: str) -> bool:
    return name in sys.modules


class Boom(Exception):
    pass


def boom(text: str) -> None:
    def inner() -> None:
        raise Boom(text)

    inner()


def give_system() -> Callable[..., Any]:
    """Returns a function of an unallowed module: usable only as a ref, and refused when called."""
    return os.system


def give_module() -> Any:
    return os


def gen(n: int) -> Iterator[int]:
    yield from range(n)


def echo(*args: Any, **kwargs: Any) -> Any:
    return [list(args), kwargs]


def types_of(*args: Any) -> list[str]:
    return [type(a).__name__ for a in args]


def key_types(d: dict[Any, Any]) -> list[list[str]]:
    return sorted([type(k).__name__, repr(k)] for k in d)


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def log_to(path: str, text: str) -> str:
    """Append ``text`` to a file: proves whether a request ran at all."""
    with open(path, "a") as f:
        f.write(text + "\n")
    return text


class Holder:
    """An object with public attributes that lead elsewhere."""

    def __init__(self) -> None:
        self.fn = os.system
        self.mod = os
        self.value = 1
        self.gen = gen(3)

    def get(self) -> int:
        return self.value


def hold(started: str, release: str, value: Any = None) -> Any:
    """Mark ``started`` (the test now knows the worker runs this), then wait for ``release``."""
    open(started, "w").close()
    wait_for(release)
    return value


def die(code: int) -> None:
    """Kill this worker (``os._exit`` is out of reach under an allow-list: it starts with ``_``)."""
    os._exit(code)
