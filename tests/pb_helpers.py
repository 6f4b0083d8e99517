"""Helper functions registered with ``@poolbridge.helper`` (imported by workers via ``helpers=``)."""

from __future__ import annotations

from typing import Any

from pb_testmods import whoami

import poolbridge


@poolbridge.helper
def pbh_add(a: int, b: int) -> int:
    return a + b


@poolbridge.helper("pbh_custom_name")
def _pbh_registered_under_another_name(x: Any) -> Any:
    return ["custom", x]


@poolbridge.helper()
def pbh_empty_parens(x: int) -> int:
    return x * 2


@poolbridge.helper
def pbh_whoami() -> Any:
    return whoami()


@poolbridge.helper(context=True)
def pbh_ctx(ctx: poolbridge.SessionContext) -> Any:
    return {
        "type": type(ctx).__name__,
        "session": ctx.session_id,
        "slot": ctx.slot,
        "generation": ctx.generation,
        "is_current": ctx is poolbridge.current_session(),
    }


@poolbridge.helper(context=True)
def pbh_remember(ctx: poolbridge.SessionContext, key: str, value: Any) -> int:
    ctx.state[key] = value
    return len(ctx.state)


@poolbridge.helper(context=True)
def pbh_recall(ctx: poolbridge.SessionContext, key: str) -> Any:
    return ctx.state.get(key, "<missing>")


@poolbridge.helper("pbh_named_ctx", context=True)
def _pbh_named_ctx(ctx: poolbridge.SessionContext, key: str) -> Any:
    return [ctx.session_id, sorted(ctx.state)]


@poolbridge.helper
def pbh_raises(message: str) -> None:
    raise KeyError(message)
