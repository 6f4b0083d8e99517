"""The commands of ``python -m poolbridge`` that run in the calling process — ``demo`` and
``bench`` — and the plain-text help of every command. (``serve`` lives in __main__.py.)

These are programs, not library code: they print their output to stdout.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

__all__ = ["add_bench_parser", "plain_help", "run_command"]

_MARKUP = re.compile(r"``?([^`]+)``?")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help when it has a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "default" not in text.lower()
            and default not in (None, [], False, argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def plain_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Strip reST/Markdown code markup from every help text and add defaults, in every subcommand."""
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
            for choice in action._choices_actions:
                choice.help = _MARKUP.sub(r"\1", choice.help or "")
    for p in parsers:
        p.formatter_class = _HelpFormatter
        if p.description:
            p.description = _MARKUP.sub(r"\1", p.description)
        for action in p._actions:
            if action.help and action.help is not argparse.SUPPRESS:
                action.help = _MARKUP.sub(r"\1", action.help)
    return parser


def add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="measure Pool.map against multiprocessing and concurrent.futures",
                           description="Pool.map of a tiny function against multiprocessing.Pool.map and\n"
                           "ProcessPoolExecutor.map, in the same run; prints the ratio table.")
    bench.add_argument("--items", type=int, default=100_000, help="items mapped per round")
    bench.add_argument("--rounds", type=int, default=30, help="timed rounds per case; the best one counts")
    bench.add_argument("--workers", type=int, default=2, help="worker processes of every pool")


def run_command(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _demo()
    return _bench(args)


def _demo() -> int:
    import poolbridge

    with poolbridge.Pool(workers=2) as pool:
        print(pool)
        with pool.session("alice"):
            print("math.sqrt(2) =", pool.call("math.sqrt", 2))
            counter = pool.create("collections.Counter")
            pool.method(counter, "update", "hello")
            print("counter['l'] =", pool.method(counter, "__getitem__", "l"), "  ", counter)
            print("streamed:", list(pool.stream("builtins.range", 5)))
        print(f"alice -> slot {pool.slot_for('alice')}, bob -> slot {pool.slot_for('bob')}")
        print("map:", list(pool.map(abs, range(-3, 3))))
        print("per-session map:", list(pool.map("builtins.str", range(6), session=lambda i: f"user-{i % 2}")))
        print("every worker's pid:", pool.broadcast(os.getpid))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ._bench import format_table, run

    if args.items < 1 or args.rounds < 1 or args.workers < 1:
        raise SystemExit("bench: --items, --rounds and --workers must be at least 1")
    print(format_table(run(items=args.items, rounds=args.rounds, workers=args.workers), args.workers))
    return 0
