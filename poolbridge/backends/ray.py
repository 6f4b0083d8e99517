"""Ray backend: each worker slot is a Ray actor that runs the same :class:`WorkerCore`.

``Pool(backend="ray", workers=N, ray_init={...})`` builds its router with :func:`ray_channel_factory`.
Everything above the channel — session resolution, hashing, refs, streams, errors, restarts with
``generation + 1`` — is the core's, unchanged; only the transport differs::

    caller ── router.send ──▶ RayChannel.send ── actor.handle.remote(body) ──▶ _SlotWorker.handle
                                                                                  │ WorkerCore.handle
    sink.deliver ◀── delivery thread ◀── queue ◀── ObjectRef done-callback ◀──────┘ (reply bytes)

*Sending.* The channel contract of the process channel (_channel.py): a request sent to an actor
already gone raises ``Retired`` (it reached no one; the supervisor sends it to the next generation),
and waiting at the in-flight bound honours the call's deadline.

*Order.* An actor runs one method at a time, in the order one caller submitted them (``max_concurrency``
is 1 and no concurrency groups are used), which is exactly the worker's sequential per-slot order.

*Replies.* Each request's ObjectRef gets a done-callback that only enqueues; one delivery thread per
channel unpacks replies and hands them to their sinks, so no Ray API and no user code (future
callbacks) ever runs on Ray's own callback thread.

*Death.* Ray reports a dead actor on every call in flight (``RayActorError``); a local actor's process
is also watched by the supervisor's exit monitor (_monitor.py, a pidfd), so an idle actor killed by a
signal is noticed (and its slot restarted) at once. Either way the supervisor is told exactly once
(``Supervisor._channel_exited``) on a separate thread: it drains replies that already arrived, fails the
rest with :class:`WorkerCrashedError` and starts a new actor with ``generation + 1`` — refs of the old
generation then raise :class:`SessionLostError`. Actors are created with ``max_restarts=0``: a Ray-side
restart would bring back an empty store under the same generation, turning "session lost" into "ref not
found".

*Ray itself.* If Ray is not initialised when the first Ray pool starts, poolbridge starts a local
instance (or connects to ``ray_init["address"]``) and shuts it down when the last Ray pool closes. If
the application called ``ray.init`` itself, poolbridge neither re-initialises nor shuts it down.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:
    import ray
    from ray.exceptions import RayActorError
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise ImportError("backend='ray' needs Ray: pip install 'poolbridge[ray]'") from exc

from .._channel import Pending, Retired, wait_for_room
from .._errors import PoolClosedError, RemoteError, WorkerCrashedError
from .._wire import decode_reply
from ._ray_actor import RemoteSlotWorker
from ._ray_runtime import runtime

if TYPE_CHECKING:
    from .._channel import Channel, Sink
    from .._supervisor import Supervisor

__all__ = ["RayChannel", "ray_channel_factory"]

log = logging.getLogger("poolbridge.ray")

#: Bound on waiting for every actor of a new pool to answer its first ping (Ray may have to start
#: worker processes, and on a cold cluster pull a runtime environment).
START_WAIT = 120.0
#: After a death, how long in-flight calls may take to settle (replies that already arrived are
#: delivered; Ray reports the rest as failed within tens of milliseconds on one machine).
DRAIN_WAIT = 2.0
#: Bound on waiting for a killed local actor's process to disappear.
EXIT_WAIT = 10.0

_ACTOR_OPTIONS: dict[str, Any] = {
    "num_cpus": 0,  # slots are not CPU reservations: N slots fit on any machine
    "max_restarts": 0,  # poolbridge restarts a slot itself, with generation + 1
    "max_task_retries": 0,
    "max_concurrency": 1,  # one request at a time, in order
    "scheduling_strategy": "SPREAD",
}
_UNSUPPORTED = ("max_calls", "max_rss")
#: Actor calls a channel keeps in flight; requests sent meanwhile queue and go as one batch call
#: when one returns (the actor runs one at a time anyway, so this costs no parallelism).
MAX_OUTSTANDING = 2
MAX_BATCH = 512


# -- the channel -----------------------------------------------------------------------------------

_STOP = object()


class RayChannel:
    """One generation of one slot, backed by a Ray actor (same surface as ``ProcessChannel``)."""

    def __init__(self, router: Supervisor, slot: int, generation: int, *, hold_exit: bool = False) -> None:
        self.slot = slot
        self.generation = generation
        self.pending: Pending = Pending()
        self.dead = False
        self.eof = False
        self.exitcode: int | None = None
        #: Set once the router has drained this channel and failed what was left.
        self.finished = threading.Event()
        self.max_in_flight = router.max_in_flight
        self._supervisor = router
        # One lock for submission order, the dead/input-closed checks, the batch tables and the
        # once-only exit report; ``_settle`` (same lock) is notified whenever a batch settles.
        self._lock = threading.RLock()
        self._settle = threading.Condition(self._lock)
        self._inflight: dict[int, list[int]] = {}  # batch id -> its req ids, submitted, not settled
        self._queued: list[tuple[int, bytes]] = []  # (req id, body) waiting for a free batch
        self._batch_ids = itertools.count()
        self._space_waiters = 0
        self._input_closed = False
        #: Part of the channel surface: the process backend's recycling (max_calls/max_rss) is not
        #: done on Ray, so a Ray channel never retires.
        self.retiring = False
        self._ending_actor = False
        self._drained = False
        self._reported = False
        self._hold_exit = hold_exit  # during pool start-up: failures raise from Pool(), no restarts
        self._death_reason = ""
        self._gone = threading.Event()  # the actor (its process, where we can see it) is gone
        self._local = False
        self._pid = -1
        self._up = threading.Event()  # the first ping settled (pid known, or the actor failed to start)
        self._start_error: BaseException | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        options = {k: v for k, v in router.worker_options.items() if k not in _UNSUPPORTED}
        self._actor = RemoteSlotWorker.options(**_ACTOR_OPTIONS).remote(slot, router.n_slots, generation, options)
        self._delivery = threading.Thread(
            target=self._deliver_loop, name=f"poolbridge-ray-{slot}.{generation}", daemon=True
        )
        self._delivery.start()
        ping = self._actor.ping.remote()
        ping.future().add_done_callback(self._pinged)

    # -- identity --------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The actor process's pid (waits, bounded, for the actor to come up); -1 if it never did."""
        if not self._up.is_set():
            self._up.wait(1.0 if self.dead else START_WAIT)  # a dead channel's ping may never settle
        return self._pid

    def wait_started(self, timeout: float) -> BaseException | None:
        """Wait for the first ping; the error if the actor failed to start (or did not in time)."""
        if not self._up.wait(timeout):
            return TimeoutError(f"the actor of slot {self.slot} did not start within {timeout:.0f}s")
        return self._start_error

    def _pinged(self, future: Any) -> None:
        try:
            pid, node_id = future.result()
        except BaseException as exc:
            self._start_error = exc
            self._up.set()
            self._died(f"the actor failed to start: {exc}")
            return
        self._pid = pid
        self._local = node_id == runtime.node_id
        self._up.set()
        if not (self._local and self._supervisor.monitor.watch_pid(pid, self._process_exited)):
            self._local = False

    def _process_exited(self) -> None:
        self._gone.set()
        self._died("its process exited")

    # -- sending ---------------------------------------------------------------------------

    def send(self, req_id: int, data: bytes, sink: Sink, block: bool = True, deadline: float | None = None) -> None:
        """Submit one framed request to the actor. Raises :class:`Retired` if the actor is gone: the
        request reached no one, and the supervisor sends it to the slot's next generation (as it
        does for a process channel)."""
        if len(self.pending) >= self.max_in_flight:
            self._wait_for_space(block, deadline)
        body = data[4:]  # the actor takes the frame body, as WorkerCore.handle does
        with self._lock:
            if self._input_closed:
                raise PoolClosedError("the pool is closed")
            if self.dead:
                raise Retired
            self.pending[req_id] = sink
            if len(self._inflight) < MAX_OUTSTANDING:
                self._submit([(req_id, body)])
            else:  # the actor is busy anyway: this goes with the next batch
                self._queued.append((req_id, body))

    def _submit(self, items: list[tuple[int, bytes]]) -> None:
        """One actor call for ``items`` (in order). Called with the lock held: submission order is send order."""
        batch = next(self._batch_ids)
        if len(items) == 1:
            ref = self._actor.handle.remote(items[0][1])
        else:
            ref = self._actor.handle_many.remote([body for _, body in items])
        self._inflight[batch] = [req_id for req_id, _ in items]
        put = self._queue.put
        ref.future().add_done_callback(lambda future: put((batch, future)))

    def _wait_for_space(self, block: bool, deadline: float | None = None) -> None:
        wait_for_room(self, self._settle, block, deadline)

    def try_cancel(self, req_id: int, seq: int) -> bool:
        """Cancel a request the actor has not started. True: it will never run. Only a request still
        queued here (waiting for the next batch) is sure not to have started; one handed to the
        actor may be running, so it is not cancelled (False: its reply or its crash comes)."""
        with self._settle:
            for i, (queued, _) in enumerate(self._queued):
                if queued == req_id:
                    del self._queued[i]
                    break
            else:
                return False
            cancelled = self.pending.pop(req_id, None) is not None
            self._settle.notify_all()  # room under the in-flight bound
            return cancelled

    def wake_reader(self) -> None:
        """Nothing to do: replies are delivered by this channel's delivery thread."""

    def await_reply(self, req_id: int, waiter: Any, timeout: float | None) -> bool:
        """Block until ``waiter`` has its reply (delivered, or failed on death). False on timeout."""
        if waiter.status is not None:
            return True
        return bool(waiter.wait(timeout))

    # -- replies ---------------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            batch, future = item
            with self._lock:
                req_ids = self._inflight.get(batch, [])
            try:
                self._deliver(req_ids, future)
            except Exception:
                log.exception("slot %d: delivering replies %s failed", self.slot, req_ids)
            with self._settle:
                self._inflight.pop(batch, None)
                if self._queued and not self.dead:
                    items = self._queued[:MAX_BATCH]
                    del self._queued[:MAX_BATCH]
                    self._submit(items)
                idle = not self._inflight and not self._queued
                self._settle.notify_all()
            if idle and self._input_closed and not self._ending_actor:
                self._retire()
            if idle and self._drained:
                return

    def _deliver(self, req_ids: list[int], future: Any) -> None:
        try:
            result = future.result()
        except RayActorError as exc:
            self._died(_first_line(exc))
            if self._drained:  # the router already failed what was pending; these came late
                for req_id in req_ids:
                    self._fail(req_id, self._crash_error())
            return
        except BaseException as exc:
            for req_id in req_ids:
                self._fail(req_id, RemoteError(type(exc).__name__, str(exc)))
            return
        pending = self.pending
        for reply in [result] if isinstance(result, bytes) else result:
            rid, status, body = decode_reply(reply)
            sink = pending.pop(rid, None)
            if sink is None:
                sink = pending.unmatched(rid)  # given up meanwhile: its Late sink, or unknown
            if sink is not None:
                sink.deliver(status, body)

    def _fail(self, req_id: int, exc: BaseException) -> None:
        sink = self.pending.pop(req_id, None)
        if sink is not None:
            sink.fail(exc)

    def _crash_error(self) -> WorkerCrashedError:
        return WorkerCrashedError(
            f"worker slot {self.slot} (Ray actor pid {self._pid}, generation {self.generation}) died: "
            f"{self._death_reason}",
            slot=self.slot,
            pid=self._pid,
        )

    # -- death -----------------------------------------------------------------------------

    def _died(self, reason: str) -> None:
        """The actor is gone (or going): tell the router once, from a thread of our own."""
        with self._lock:
            self.dead = True
            if not self._death_reason:
                self._death_reason = reason
            if self._reported or self._hold_exit:
                return
            self._reported = True
        if not self._supervisor.closing and not runtime.exiting:
            log.warning("slot %d: Ray actor (generation %d) died: %s", self.slot, self.generation, reason)
        threading.Thread(target=self._report_exit, name="poolbridge-ray-reaper", daemon=True).start()

    def release_hold(self) -> None:
        """Start-up is over: deaths from now on restart the slot (one that happened meanwhile, now)."""
        with self._lock:
            self._hold_exit = False
            if not self.dead or self._reported:
                return
        self._died(self._death_reason)

    def _report_exit(self) -> None:
        try:
            self._kill_actor()  # ActorUnavailableError and friends: make the death final
            if not self._local:
                self._gone.set()
            self._supervisor._channel_exited(self)
        except Exception:
            log.exception("slot %d: handling the actor's death failed", self.slot)
        finally:
            self.finished.set()
            if self._supervisor.closing:
                _maybe_release(self._supervisor)

    def drain_and_close(self) -> None:
        """After the death: let replies already on their way be delivered (bounded), then stop."""
        with self._lock:
            self.dead = True
        deadline = time.monotonic() + DRAIN_WAIT
        with self._settle:
            while self._inflight and (remaining := deadline - time.monotonic()) > 0:
                self._settle.wait(remaining)
            self._drained = True
            self._queued.clear()  # never sent: still in ``pending``, the router fails them
            idle = not self._inflight
            self._settle.notify_all()
        if idle:
            self._queue.put(_STOP)

    def _retire(self) -> None:
        """Input closed and nothing in flight: the actor can go."""
        self._ending_actor = True
        threading.Thread(target=self.kill, name="poolbridge-ray-retire", daemon=True).start()

    def close_input(self) -> None:
        """No more requests; the actor is killed once the ones in flight have replied."""
        with self._lock:
            self._input_closed = True
        self.release_hold()
        with self._settle:
            idle = not self._inflight and not self._queued
        if idle and not self._ending_actor:
            self._retire()

    def _kill_actor(self) -> None:
        if ray.is_initialized():
            try:
                ray.kill(self._actor, no_restart=True)
            except Exception as exc:
                log.debug("slot %d: ray.kill: %s", self.slot, exc)

    def kill(self) -> None:
        """Kill the actor now; calls in flight fail with :class:`WorkerCrashedError` (restart follows)."""
        self._kill_actor()
        with self._lock:
            if self.exitcode is None:
                self.exitcode = -9  # ray.kill is a forced kill
        self.release_hold()
        self._died("killed by poolbridge (ray.kill)")

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the actor to be gone (its process, if local). None if it is still there.

        When the pool is closing, the last slot's call also waits (bounded) for every other slot
        to be gone and settled, then lets Ray go if poolbridge started it — so ``Pool.close()``
        returns with nothing of the pool left running.
        """
        if not self._gone.wait(timeout):
            return None
        router = self._supervisor
        channels = [ch for ch in router.channels() if isinstance(ch, RayChannel)]
        if router.closing and channels and channels[-1] is self:
            deadline = time.monotonic() + EXIT_WAIT
            for ch in channels:
                ch._gone.wait(max(0.0, deadline - time.monotonic()))
                ch.finished.wait(max(0.0, deadline - time.monotonic()))
            _maybe_release(router)
        return self.exitcode if self.exitcode is not None else 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "Worker exit detail" in line or "The actor is dead" in line:
            return line.strip()[:300]
    return (text.splitlines() or [type(exc).__name__])[0][:300]


def _maybe_release(router: Supervisor) -> None:
    """When every channel of a closing router is gone and settled, let Ray go (if we started it)."""
    channels = [ch for ch in router.channels() if isinstance(ch, RayChannel)]
    if not all(ch._gone.is_set() and ch.finished.is_set() for ch in channels):
        return
    runtime.release(router)


# -- the factory -------------------------------------------------------------------------------------


def ray_channel_factory(ray_init: dict[str, Any]) -> Callable[[Supervisor, int, int], RayChannel]:
    """The ``channel_factory`` of ``Pool(backend="ray")``: one actor per slot and generation.

    The first call starts (or joins) Ray. A pool's first generation is started in parallel: the
    factory returns each channel at once and, with the last slot, waits for all of them to answer a
    ping — so a failure to start (a helper module the actors cannot import, say) raises from
    ``Pool(...)`` instead of restarting slots forever.
    """
    ray_init = dict(ray_init)
    starting: dict[int, list[RayChannel]] = {}

    def factory(router: Supervisor, slot: int, generation: int) -> RayChannel:
        runtime.acquire(router, ray_init)
        if generation > 0:
            return RayChannel(router, slot, generation)
        if any(router.worker_options.get(k) is not None for k in _UNSUPPORTED):
            log.warning("the Ray backend does not recycle workers: max_calls/max_rss_per_worker are ignored")
        ch = RayChannel(router, slot, generation, hold_exit=True)
        batch = starting.setdefault(id(router), [])
        batch.append(ch)
        if slot < router.n_slots - 1:
            return ch
        del starting[id(router)]
        deadline = time.monotonic() + START_WAIT
        for started in batch:
            error = started.wait_started(max(0.0, deadline - time.monotonic()))
            if error is not None:
                # ``ch`` is not the router's yet: end it here, silently. The router's close (it
                # runs when this raises) ends the others, and releases Ray when they are gone.
                ch._reported = True
                ch.kill()
                ch.finished.set()
                ch._queue.put(_STOP)
                if len(batch) == 1:
                    runtime.release(router)
                raise WorkerCrashedError(
                    f"worker slot {started.slot} failed to start as a Ray actor: {_first_line(error)}",
                    slot=started.slot,
                ) from error
        for started in batch:
            started.release_hold()
        return ch

    return factory


if TYPE_CHECKING:

    def _is_a_channel(ch: RayChannel) -> Channel:  # mypy: RayChannel implements the channel contract
        return ch
