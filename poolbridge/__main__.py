"""``python -m poolbridge serve`` — the Port server — and ``python -m poolbridge demo``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence


def _fds(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fds takes IN,OUT (e.g. 3,4), got {text!r}") from None
    if a < 0 or b < 0:
        raise argparse.ArgumentTypeError("file descriptors must be non-negative")
    return a, b


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m poolbridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the Port server (docs/protocol.md) on stdio or --fds")
    serve.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (slots)")
    serve.add_argument("--fds", type=_fds, default=None, metavar="IN,OUT",
                       help="protocol fds instead of stdio (Elixir :nouse_stdio uses 3,4)")
    serve.add_argument("--allow-module", action="append", default=[], metavar="PATTERN", dest="allow_modules",
                       help="only dotted paths under a module matching PATTERN (fnmatch) may be used; repeatable")
    serve.add_argument("--max-frame", type=int, default=None, metavar="BYTES", help="largest request frame accepted")
    serve.add_argument("--helpers", action="append", default=[], metavar="MODULE",
                       help="module imported in every worker whose @poolbridge.helper functions are callable")
    serve.add_argument("--session-ttl", type=float, default=None, metavar="SECONDS",
                       help="drop a session's state after this long idle")
    serve.add_argument("--max-refs", type=int, default=None, help="cap on refs and streams per session")
    serve.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                       help="unanswered requests per worker before new ones get a `busy` error")
    serve.add_argument("--log-level", default="WARNING", help="logging level (logs go to stderr)")
    serve.add_argument("--backend", choices=("process", "ray"), default="process",
                       help="worker processes (default), or one Ray actor per slot")
    serve.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="with --backend ray: the cluster to join (default: start a local Ray)")
    sub.add_parser("demo", help="run a short demo of the Pool API")
    return parser


def _demo() -> int:
    import poolbridge

    log = logging.getLogger("poolbridge.demo")
    with poolbridge.Pool(workers=2) as pool:
        with pool.session("alice"):
            log.warning("math.sqrt(2) = %s", pool.call("math.sqrt", 2))
            counter = pool.create("collections.Counter")
            pool.method(counter, "update", "hello")
            log.warning("counter['l'] = %s", pool.method(counter, "__getitem__", "l"))
            log.warning("streamed: %s", list(pool.stream("builtins.range", 5)))
        log.warning("alice -> slot %d, bob -> slot %d", pool.slot_for("alice"), pool.slot_for("bob"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
        return _demo()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="poolbridge[%(process)d] %(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    from ._portproc import serve
    from ._protocol import MAX_FRAME_DEFAULT

    return serve(
        workers=args.workers,
        fds=args.fds,
        allow_modules=args.allow_modules,
        max_frame=args.max_frame if args.max_frame is not None else MAX_FRAME_DEFAULT,
        helpers=args.helpers,
        session_ttl=args.session_ttl,
        max_refs_per_session=args.max_refs,
        max_in_flight=args.max_in_flight,
        backend=args.backend,
        ray_address=args.ray_address,
    )


if __name__ == "__main__":
    sys.exit(main())
