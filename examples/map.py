"""poolbridge as an Executor: map over many items, per-user order, warm state per worker and session.

Run: python examples/map.py
"""

import asyncio
import itertools
import os

import poolbridge
from poolbridge import Pool


def setup(greeting: str) -> None:
    """The pool's initializer: once in every worker process (and again after a restart)."""
    os.environ["GREETING"] = greeting


def load_model(session_id: str) -> dict:
    """The per-session initializer: once per session, the first time it reaches its worker."""
    return {"user": session_id, "weights": len(session_id), "loaded_in": os.getpid()}


def score(event: dict) -> tuple:
    model = poolbridge.current_session().state["session_init"]  # what load_model returned
    return event["user"], event["seq"], event["value"] * model["weights"], model["loaded_in"]


def main() -> None:
    with Pool(workers=4, initializer=setup, initargs=("hello",), session_init=load_model) as pool:
        # 1. A concurrent.futures.Executor: chunked map, many items per request.
        print("squares:", list(pool.map(pow, range(10), itertools.repeat(2)))[:10])
        print("greeting in every worker:", pool.broadcast(lambda: os.environ["GREETING"]))

        # 2. Per-key order with parallelism: each user's events in order, in that user's worker.
        events = ({"user": f"user-{i % 3}", "seq": i // 3, "value": i} for i in range(12))
        for user, seq, value, pid in pool.imap(score, events, session=lambda e: e["user"]):
            print(f"  {user} #{seq}: {value} (model loaded once, in worker {pid})")

        # 3. Lazy: an endless input, at most buffersize x chunksize items ahead of the consumer.
        with pool.imap(abs, itertools.count(), chunksize=100, buffersize=4) as endless:
            for value in endless:
                if value == 100_000:
                    print("100,000 items from an endless iterator, memory flat")
                    break

        # 4. asyncio: run_in_executor takes the pool; the async face has `async for` maps.
        async def with_asyncio() -> None:
            loop = asyncio.get_running_loop()
            print("run_in_executor:", await loop.run_in_executor(pool, pow, 2, 16))
            print("async map:", [x async for x in pool.aio.map(abs, range(-3, 3))])

        asyncio.run(with_asyncio())


if __name__ == "__main__":
    main()
