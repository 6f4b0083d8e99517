"""The public API surface: ``poolbridge.__all__`` is exactly this list and every name imports.

In the style of anyio's ``test_all_attributes``: a name added or removed by accident fails here.
"""

from __future__ import annotations

import concurrent.futures.process
import dataclasses
import inspect
import pickle

import pytest

import poolbridge

PUBLIC_NAMES = [
    "AsyncMapIterator",
    "AsyncPool",
    "AsyncStream",
    "BadRequestError",
    "CallTimeoutError",
    "FrameTooLargeError",
    "HelperNotFoundError",
    "MapIterator",
    "MisroutedError",
    "NotAllowedError",
    "Pool",
    "PoolBusyError",
    "PoolClosedError",
    "PoolStats",
    "PoolbridgeError",
    "Ref",
    "RefNotFoundError",
    "RemoteError",
    "RemoteTraceback",
    "ResizeRecord",
    "SessionContext",
    "SessionLimitError",
    "SessionLostError",
    "SessionMismatchError",
    "SlotStats",
    "Stream",
    "ValueTooLargeError",
    "WorkerCrashedError",
    "__version__",
    "current_session",
    "helper",
    "jump_hash",
    "resolve_session",
    "stable_hash64",
]

ERROR_NAMES = [n for n in PUBLIC_NAMES if n.endswith("Error")]


def test_all_is_exactly_the_public_names() -> None:
    assert len(poolbridge.__all__) == len(set(poolbridge.__all__)), "duplicates in __all__"
    assert sorted(poolbridge.__all__) == sorted(PUBLIC_NAMES)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_all_attributes(name: str) -> None:
    # importable both ways, and the same object both ways
    namespace: dict[str, object] = {}
    exec(f"from poolbridge import {name}", namespace)
    assert namespace[name] is getattr(poolbridge, name)
    obj = getattr(poolbridge, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert obj.__module__.startswith("poolbridge"), f"{name} comes from {obj.__module__}"
        assert not obj.__name__.startswith("_")
        assert obj.__doc__, f"{name} has no docstring"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from poolbridge import *", namespace)
    namespace.pop("__builtins__", None)
    assert set(namespace) == set(PUBLIC_NAMES)


def test_no_public_name_outside_all() -> None:
    public = {n for n, v in vars(poolbridge).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert public <= set(poolbridge.__all__), public - set(poolbridge.__all__)


def test_version_is_a_string() -> None:
    assert isinstance(poolbridge.__version__, str)
    assert poolbridge.__version__.count(".") >= 1


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_errors_derive_from_poolbridge_error_and_have_a_code(name: str) -> None:
    cls = getattr(poolbridge, name)
    assert issubclass(cls, Exception)
    assert issubclass(cls, poolbridge.PoolbridgeError)
    assert isinstance(cls.code, str) and cls.code


def test_error_codes_are_unique() -> None:
    codes = [getattr(poolbridge, n).code for n in ERROR_NAMES if n != "PoolbridgeError"]
    assert len(codes) == len(set(codes)), codes


@pytest.mark.parametrize(
    ("name", "stdlib_base"),
    [
        ("SessionMismatchError", ValueError),
        ("RefNotFoundError", LookupError),
        ("HelperNotFoundError", LookupError),
        ("BadRequestError", ValueError),
        ("FrameTooLargeError", poolbridge.BadRequestError),
        ("ValueTooLargeError", ValueError),
        ("NotAllowedError", PermissionError),
        ("PoolClosedError", RuntimeError),
        ("CallTimeoutError", TimeoutError),
        ("WorkerCrashedError", concurrent.futures.process.BrokenProcessPool),
    ],
)
def test_errors_subclass_the_stdlib_error_a_caller_would_catch(name: str, stdlib_base: type) -> None:
    assert issubclass(getattr(poolbridge, name), stdlib_base)


def test_worker_crashed_error_pickles_with_its_fields() -> None:
    exc = poolbridge.WorkerCrashedError("died", slot=1, pid=123, exitcode=-9)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is poolbridge.WorkerCrashedError
    assert (str(back), back.slot, back.pid, back.exitcode, back.signal) == ("died", 1, 123, -9, 9)


def test_remote_error_pickles_with_its_fields() -> None:
    exc = poolbridge.RemoteError("mod.Bad", "went wrong", "Traceback ...")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is poolbridge.RemoteError
    assert (back.type_name, back.message, back.remote_traceback) == ("mod.Bad", "went wrong", "Traceback ...")
    assert str(back) == "mod.Bad: went wrong"
    assert back.code == "remote_error"


# -- the shape of the main classes -----------------------------------------------------------

POOL_METHODS = [
    "call",
    "submit",
    "getattr",
    "setattr",
    "create",
    "method",
    "release",
    "stream",
    "helper",
    "session",
    "options",
    "slot_for",
    "close_session",
    "stats",
    "pids",
    "close",
    # concurrent.futures.Executor, and mapping
    "map",
    "imap",
    "starmap",
    "broadcast",
    "shutdown",
]


@pytest.mark.parametrize("name", POOL_METHODS)
def test_pool_has_method(name: str) -> None:
    assert callable(getattr(poolbridge.Pool, name))


def test_pool_signature() -> None:
    params = inspect.signature(poolbridge.Pool).parameters
    keyword_only = ("helpers", "session_ttl", "max_refs_per_session", "initializer", "initargs", "session_init")
    for name in ("workers", *keyword_only):
        assert name in params
    for name in keyword_only:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_pool_is_a_concurrent_futures_executor() -> None:
    assert issubclass(poolbridge.Pool, concurrent.futures.Executor)
    shutdown = inspect.signature(poolbridge.Pool.shutdown).parameters
    assert shutdown["wait"].default is True
    assert shutdown["cancel_futures"].default is False
    params = inspect.signature(poolbridge.Pool.map).parameters
    for name in ("timeout", "chunksize", "session", "buffersize", "progress"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(poolbridge.Pool.imap).parameters["ordered"].default is True


def test_async_pool_has_closed_and_map_iterators() -> None:
    assert isinstance(poolbridge.AsyncPool.closed, property)
    for name in ("__aiter__", "__anext__", "__aenter__", "__aexit__", "aclose"):
        assert callable(getattr(poolbridge.AsyncMapIterator, name))
    for name in ("__iter__", "__next__", "__enter__", "__exit__", "close"):
        assert callable(getattr(poolbridge.MapIterator, name))


ASYNC_POOL_METHODS = [
    "call",
    "submit",
    "getattr",
    "setattr",
    "create",
    "method",
    "release",
    "stream",
    "helper",
    "session",
    "options",
    "slot_for",
    "close_session",
    "stats",
    "aclose",
    "__aenter__",
    "__aexit__",
    "map",
    "imap",
    "starmap",
    "broadcast",
    "pids",
]


@pytest.mark.parametrize("name", ASYNC_POOL_METHODS)
def test_async_pool_has_method(name: str) -> None:
    assert callable(getattr(poolbridge.AsyncPool, name))


def test_pool_has_an_asyncio_face() -> None:
    assert isinstance(poolbridge.Pool.aio, property)
    for name in ("__aiter__", "__anext__", "__aenter__", "__aexit__", "aclose"):
        assert callable(getattr(poolbridge.AsyncStream, name))


@pytest.mark.parametrize(
    "name", ["call", "submit", "getattr", "setattr", "release", "options", "acall", "agetattr", "asetattr", "arelease"]
)
def test_ref_has_method(name: str) -> None:
    assert callable(getattr(poolbridge.Ref, name))


def test_ref_is_a_self_routing_handle() -> None:
    params = list(inspect.signature(poolbridge.Ref).parameters)
    assert params[1:] == ["session_id", "ref_id", "slot", "generation"]


def test_stream_is_an_iterator_and_context_manager() -> None:
    for name in ("__iter__", "__next__", "__enter__", "__exit__", "close"):
        assert callable(getattr(poolbridge.Stream, name))
    assert isinstance(poolbridge.Stream.session_id, property)
    assert isinstance(poolbridge.Stream.closed, property)


def test_stats_are_frozen_dataclasses() -> None:
    for cls in (poolbridge.PoolStats, poolbridge.SlotStats):
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    slot_fields = {f.name for f in dataclasses.fields(poolbridge.SlotStats)}
    assert {
        "slot",
        "pid",
        "generation",
        "alive",
        "restarts",
        "in_flight",
        "sessions",
        "refs",
        "streams",
        "calls",
        "rss",
    } <= slot_fields
    assert {"workers", "slots"} <= {f.name for f in dataclasses.fields(poolbridge.PoolStats)}


def test_session_context_fields() -> None:
    ctx = poolbridge.SessionContext("s", 1, 2)
    assert (ctx.session_id, ctx.slot, ctx.generation, ctx.state) == ("s", 1, 2, {})
    assert "s" in repr(ctx)


def test_current_session_is_none_outside_a_worker() -> None:
    assert poolbridge.current_session() is None


def test_hash_functions_are_exported_and_agree_with_slot_routing() -> None:
    from poolbridge import _hashing

    for sid in ("a", "user-42", "é", "x" * 256):
        assert _hashing.slot_for(sid, 7) == poolbridge.jump_hash(poolbridge.stable_hash64(sid), 7)


def test_a_worker_process_imports_only_the_child_side() -> None:
    # Public names load on first use (PEP 562): a worker, which imports this package at every
    # start and restart, must not pay for asyncio, the router or the Port server.
    import subprocess
    import sys

    code = (
        "import sys, poolbridge._worker_template\n"
        "print(sorted(m for m in ('asyncio', 'cloudpickle', 'poolbridge._pool', 'poolbridge._aio',"
        " 'poolbridge._server', 'poolbridge._supervisor') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
