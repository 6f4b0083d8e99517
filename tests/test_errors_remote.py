"""Errors raised by user code in a worker: the original type re-raised locally, with the remote
traceback as ``__cause__``; RemoteError when the exception cannot travel; the worker survives.
Plus timeouts and misuse errors of the API.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import make_pool
from pb_testmods import CustomError, HoldsLockError, NeedsTwoArgsError

import poolbridge
from poolbridge import Pool, RemoteError
from poolbridge._errors import RemoteTraceback

pytestmark = pytest.mark.backends  # every test with the module's ``pool``, on each backend

WAIT = 60.0


def remote_tb(exc: BaseException) -> str:
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback), f"__cause__ is {cause!r}"
    return str(cause)


@pytest.fixture
def sid() -> str:
    return f"err-{uuid.uuid4().hex[:8]}"


def test_user_exception_keeps_its_type_and_remote_traceback(pool: Pool, sid: str) -> None:
    api = pool.options(session=sid)
    pid = pool.pids()[pool.slot_for(sid)]
    with pytest.raises(CustomError, match=r"^it broke$") as info:
        api.call("pb_testmods.boom_custom_error", "it broke")
    assert type(info.value) is CustomError
    tb = remote_tb(info.value)
    assert "Traceback (most recent call last)" in tb
    assert "boom_custom_error" in tb  # the remote function's frame
    assert "pb_testmods.py" in tb
    assert "CustomError: it broke" in tb
    assert pool.pids()[pool.slot_for(sid)] == pid  # the worker survived
    assert api.call("operator.add", 1, 1) == 2


@pytest.mark.parametrize(
    ("path", "args", "exc_type", "match"),
    [
        ("pb_testmods.boom_value_error", ("bad value",), ValueError, "bad value"),
        ("pb_testmods.boom_key_error", ("missing-key",), KeyError, "missing-key"),
        ("operator.truediv", (1, 0), ZeroDivisionError, "division"),
        ("builtins.int", ("not a number",), ValueError, "invalid literal"),
        ("pb_testmods.boom_chained", ("outer",), CustomError, "outer"),
    ],
)
def test_builtin_and_chained_exceptions(
    pool: Pool, sid: str, path: str, args: tuple[Any, ...], exc_type: type[BaseException], match: str
) -> None:
    with pytest.raises(exc_type, match=match) as info:
        pool.options(session=sid).call(path, *args)
    assert type(info.value) is exc_type
    assert path.rsplit(".", 1)[1] in remote_tb(info.value) or path.startswith(("operator", "builtins"))


def test_chained_exception_traceback_shows_both(pool: Pool, sid: str) -> None:
    with pytest.raises(CustomError) as info:
        pool.options(session=sid).call("pb_testmods.boom_chained", "outer")
    tb = remote_tb(info.value)
    assert "KeyError: 'inner'" in tb and "direct cause" in tb


def test_key_error_args_survive(pool: Pool, sid: str) -> None:
    with pytest.raises(KeyError) as info:
        pool.options(session=sid).call("pb_testmods.boom_key_error", ("tuple", 1))
    assert info.value.args == (("tuple", 1),)


def test_exception_from_a_callable_names_it(pool: Pool, sid: str) -> None:
    def failing_closure_xyz(n: int) -> None:
        raise LookupError(f"closure failed {n}")

    with pytest.raises(LookupError, match="closure failed 3") as info:
        pool.options(session=sid).call(failing_closure_xyz, 3)
    assert "failing_closure_xyz" in remote_tb(info.value)


@pytest.mark.parametrize("via", ["submit", "method", "getattr", "setattr", "helper"])
def test_errors_on_every_path(pool: Pool, sid: str, via: str) -> None:
    api = pool.options(session=sid)
    if via == "submit":
        fut = api.submit("pb_testmods.boom_custom_error", "async")
        exc = fut.exception(WAIT)
        assert type(exc) is CustomError and "boom_custom_error" in remote_tb(exc)
        with pytest.raises(CustomError):
            fut.result(WAIT)
        return
    ref = api.create("pb_testmods.Counter", 1)
    if via == "method":
        with pytest.raises(TypeError) as info:
            ref.call("incr", "not-an-int")
        assert "incr" in remote_tb(info.value)
    elif via == "getattr":
        with pytest.raises(AttributeError, match="no_such_attr"):
            ref.getattr("no_such_attr")
    elif via == "setattr":
        with pytest.raises(AttributeError):
            api.setattr(api.create("pb_testmods.Recorder", "t"), "value", 1)  # read-only property
    else:
        with pytest.raises(KeyError, match="helper says no") as info:
            api.helper("pbh_raises", "helper says no")
        assert "pbh_raises" in remote_tb(info.value)
    assert ref.getattr("n") == 1


def test_exception_that_cannot_be_rebuilt_becomes_remote_error(pool: Pool, sid: str) -> None:
    with pytest.raises(RemoteError) as info:
        pool.options(session=sid).call("pb_testmods.boom_needs_two_args", "a", "b")
    err = info.value
    assert err.type_name == f"pb_testmods.{NeedsTwoArgsError.__qualname__}"
    assert err.message == "a/b"
    assert "boom_needs_two_args" in err.remote_traceback
    assert "boom_needs_two_args" in remote_tb(err)
    assert err.code == "remote_error"
    assert isinstance(err, poolbridge.PoolbridgeError)


def test_exception_that_cannot_be_pickled_becomes_remote_error(pool: Pool, sid: str) -> None:
    with pytest.raises(RemoteError) as info:
        pool.options(session=sid).call("pb_testmods.boom_holds_lock", "locked out")
    err = info.value
    assert err.type_name == f"pb_testmods.{HoldsLockError.__qualname__}"
    assert err.message == "locked out"
    assert "locked out" in str(err)
    assert "boom_holds_lock" in err.remote_traceback
    assert pool.options(session=sid).call("operator.add", 2, 3) == 5


def test_system_exit_in_user_code_fails_only_that_call(pool: Pool, sid: str) -> None:
    pid = pool.pids()[pool.slot_for(sid)]
    with pytest.raises(SystemExit):
        pool.options(session=sid).call("pb_testmods.boom_system_exit", 3)
    assert pool.pids()[pool.slot_for(sid)] == pid
    assert pool.options(session=sid).call("pb_testmods.getpid") == pid


@pytest.mark.parametrize("path", ["pb_testmods.no_such_function", "no_such_module_q1.fn", "math.no_such"])
def test_unresolvable_dotted_path(pool: Pool, sid: str, path: str) -> None:
    with pytest.raises((AttributeError, ImportError)):
        pool.options(session=sid).call(path)


def test_not_callable_target(pool: Pool, sid: str) -> None:
    with pytest.raises(TypeError):
        pool.call(42)  # neither a path, a callable nor a ref: refused locally
    with pytest.raises(TypeError):
        pool.options(session=sid).call("math.pi")  # resolved remotely, not callable


def test_unknown_helper(pool: Pool, sid: str) -> None:
    with pytest.raises(poolbridge.HelperNotFoundError, match="no_such_helper"):
        pool.options(session=sid).helper("no_such_helper")


def test_unpicklable_argument_fails_locally(pool: Pool, sid: str) -> None:
    import threading

    with pytest.raises(TypeError):
        pool.options(session=sid).call("pb_testmods.identity", threading.Lock())
    assert pool.options(session=sid).call("pb_testmods.identity", (1, 2)) == (1, 2)


# -- timeouts ------------------------------------------------------------------------------


@pytest.fixture
def gate() -> Iterator[str]:
    """A path a worker waits for; the test opens the gate by creating it."""
    with tempfile.TemporaryDirectory() as d:
        yield os.path.join(d, "gate")


def _open(path: str) -> None:
    with open(path, "w"):
        pass


def test_call_timeout(pool: Pool, sid: str, gate: str) -> None:
    api = pool.options(session=sid)
    with pytest.raises(poolbridge.CallTimeoutError) as info:
        api.options(timeout=0.2).call("pb_testmods.wait_for_path", gate)
    assert isinstance(info.value, TimeoutError)
    _open(gate)
    # the worker finishes the abandoned call, then serves this session again
    assert api.options(timeout=WAIT).call("pb_testmods.getpid") == pool.pids()[pool.slot_for(sid)]


def test_submitted_call_is_in_flight_until_its_reply(fresh_pool: Pool, sid: str, gate: str) -> None:
    pool = fresh_pool  # nothing else in flight
    assert "in_flight=0" in repr(pool)
    fut = pool.options(session=sid).submit("pb_testmods.wait_for_path", gate)
    assert "in_flight=1" in repr(pool)
    assert not fut.done()
    _open(gate)
    assert fut.result(WAIT) is True
    assert pool.options(session=sid).call("operator.add", 1, 1) == 2  # its reply came after fut's
    assert "in_flight=0" in repr(pool)


@pytest.mark.parametrize("bad", [0, -1])
def test_invalid_timeout(pool: Pool, bad: float) -> None:
    with pytest.raises(ValueError):
        pool.options(timeout=bad)


def test_closed_pool_refuses_work() -> None:
    p = make_pool(workers=1)
    p.close()
    p.close()  # idempotent
    assert p.closed
    for act in (
        lambda: p.call("operator.add", 1, 2),
        lambda: p.submit("operator.add", 1, 2),
        lambda: p.stream("pb_testmods.gen_range", 3),
        lambda: p.helper("pbh_add", 1, 2),
    ):
        with pytest.raises(poolbridge.PoolClosedError):
            act()


async def test_async_errors_keep_type_and_traceback(pool: Pool, sid: str) -> None:
    apool = pool.aio.options(session=sid)
    with pytest.raises(CustomError, match="async boom") as info:
        await apool.call("pb_testmods.boom_custom_error", "async boom")
    assert "boom_custom_error" in remote_tb(info.value)
    with pytest.raises(RemoteError) as info2:
        await apool.call("pb_testmods.boom_holds_lock", "held")
    assert "boom_holds_lock" in info2.value.remote_traceback


async def test_async_call_timeout(pool: Pool, sid: str, gate: str) -> None:
    apool = pool.aio.options(session=sid)
    with pytest.raises(poolbridge.CallTimeoutError):
        await apool.options(timeout=0.2).call("pb_testmods.wait_for_path", gate)
    _open(gate)
    assert await apool.call("pb_testmods.getpid") == pool.pids()[pool.slot_for(sid)]
