"""poolbridge in one minute: sessions pinned to workers, state that stays, streams, crash recovery.

Run: python examples/demo.py
"""

import os
import signal

from poolbridge import Pool, SessionLostError, WorkerCrashedError


def main() -> None:
    with Pool(workers=4) as pool:
        print(pool)

        # 1. Every operation of a session runs in one worker, chosen by a hash of the session id.
        for user in ("alice", "bob", "dave", "frank", "grace"):
            pids = {pool.options(session=user).call("os.getpid") for _ in range(20)}
            print(f"{user:>6}: slot {pool.slot_for(user)}, 20 calls ran in pid(s) {sorted(pids)}")

        # 2. Objects stay alive in that worker between calls (a Ref), per session.
        with pool.session("alice"):
            cart = pool.create("collections.Counter")
            cart.call("update", ["apple", "pear", "apple"])
            print("alice's cart:", cart.call("most_common"))
            print("len(cart) in the worker:", pool.call("builtins.len", cart))

        # 3. A generator stays in its worker; items arrive in batches, not one round trip each.
        total = sum(pool.options(session="frank", batch=4096).stream("builtins.range", 1_000_000))
        print("frank streamed 1,000,000 ints, sum =", total)

        # 4. A worker dies: only its sessions notice. Its slot restarts with generation + 1.
        victim = pool.slot_for("alice")
        os.kill(pool.pids()[victim], signal.SIGKILL)
        for _attempt in (1, 2):  # in flight when the kill is noticed: crashed; afterwards: lost
            try:
                cart.call("most_common")
            except (SessionLostError, WorkerCrashedError) as exc:
                print(f"after SIGKILL of slot {victim}: {type(exc).__name__}: {exc}")
        print("dave (another slot) is unaffected:", pool.options(session="dave").call("operator.add", 1, 2))
        print("alice starts fresh:", pool.options(session="alice").call("math.sqrt", 2.0))
        stats = pool.stats()
        generations, restarts = [s.generation for s in stats.slots], [s.restarts for s in stats.slots]
        print("generations by slot:", generations, "restarts:", restarts)


if __name__ == "__main__":
    main()
