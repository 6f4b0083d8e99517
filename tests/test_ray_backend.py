"""What only the Ray backend has: slots as actors, Ray's lifecycle (poolbridge starts Ray and stops it
with its last pool, and leaves it up for the pools still open), and the arguments of ``ray.init``.

The behaviours both backends share are tested once, with one body for both: tests marked
``@pytest.mark.backends`` across the suite run on the process backend and on Ray (tests/conftest.py:
the ``backend`` parameter of ``pool`` and ``pool_maker``; one Ray for the whole session). Skipped
cleanly without Ray — except under ``CI``, where Ray is installed (``.[ray]``) and a missing one is
an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import psutil
import pytest
from conftest import RAY_INIT

import poolbridge
from poolbridge import Pool
from poolbridge import _testing as testing

try:
    import ray
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs poolbridge[ray]: a missing Ray is a broken job, not a skip
    pytest.skip("Ray is not installed (pip install 'poolbridge[ray]')", allow_module_level=True)

pytestmark = pytest.mark.backends("ray")  # tests with a pool: the Ray one only


def test_ray_slots_are_actors_in_other_processes(pool: Pool) -> None:
    from poolbridge.backends.ray import RayChannel

    assert ray.is_initialized()
    assert all(isinstance(ch, RayChannel) for ch in testing.channels(pool))
    for pid in pool.pids():
        assert psutil.Process(pid).name().startswith("ray::")


def test_ray_close_lets_in_flight_calls_finish_and_ray_stays_for_other_pools(
    pool: Pool, pool_maker: Callable[..., Pool]
) -> None:
    other = pool_maker(workers=2)
    futures = [other.options(session=f"c-{i}").submit("operator.add", i, 1) for i in range(50)]
    other.close()
    assert [f.result(timeout=10) for f in futures] == [i + 1 for i in range(50)]
    with pytest.raises(poolbridge.PoolClosedError):
        other.call("operator.add", 1, 2)
    assert ray.is_initialized()  # started for the session's pool, which is still open
    assert pool.call("operator.add", 2, 2) == 4


def test_ray_init_arguments_for_a_local_start() -> None:
    from poolbridge.backends._ray_runtime import _init_kwargs

    kwargs = _init_kwargs({"runtime_env": {"env_vars": {"X": "1"}}}, 8)
    assert kwargs["num_cpus"] == 8 and kwargs["include_dashboard"] is False
    assert kwargs["runtime_env"]["env_vars"]["X"] == "1"
    assert kwargs["runtime_env"]["env_vars"]["PYTHONPATH"].split(os.pathsep)[0] in sys.path
    # Joining a cluster: nothing is added (num_cpus would be an error there).
    assert _init_kwargs({"address": "ray://head:10001"}, 8) == {"address": "ray://head:10001"}


_CYCLE_AT_SHUTDOWN = """
import gc, sys
import ray
from poolbridge import Pool

seen = []


class Holder:
    def __del__(self):
        seen.append(ray.is_initialized())


pool = Pool(workers=1, backend="ray", ray_init=RAY_INIT)
assert pool.call("operator.add", 1, 2) == 3
holder = Holder()
holder.me = holder  # a reference cycle: only the cycle collector frees it
holder.ref = ray.put(b"x")
del holder
gc.disable()  # no automatic collection: only poolbridge's own may free it in time
pool.close()
sys.stdout.write(f"{seen} {ray.is_initialized()}\\n")
"""


def test_garbage_holding_ray_objects_is_freed_before_poolbridge_shuts_ray_down() -> None:
    """Cyclic garbage holding a Ray object ref is collected while Ray is still up when the last
    poolbridge Ray pool closes: freed after ``ray.shutdown()``, an object ref reaches into a
    torn-down core worker (seen as rare interpreter crashes in a later garbage collection).
    (A Ray of its own, in a subprocess: this one must start with Ray not initialised.)"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    script = f"RAY_INIT = {RAY_INIT!r}\n" + _CYCLE_AT_SHUTDOWN
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[True] False"
