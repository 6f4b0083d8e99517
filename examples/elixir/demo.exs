# The tour, runnable:  cd examples/elixir && mix run demo.exs
# Uses `python3` (or $POOLBRIDGE_PYTHON); this checkout's poolbridge is put on PYTHONPATH, so it
# runs without installing the Python package.
repo = Path.expand("../..", __DIR__)
python = System.get_env("POOLBRIDGE_PYTHON") || "python3"

{:ok, sup} =
  Supervisor.start_link(
    [{PoolBridge, name: DemoPy, workers: 2, python: python, env: [{"PYTHONPATH", repo}]}],
    strategy: :one_for_one
  )

{:ok, info} = PoolBridge.info(DemoPy)

IO.puts(
  "server pid #{info.server_pid}, protocol #{info.protocol}, #{info.slots} workers #{inspect(info.worker_pids)}"
)

# A plain call, in this process's auto-session (created lazily, closed when the process exits).
{:ok, root} = PoolBridge.call(DemoPy, "math.sqrt", [2.0])
IO.puts("math.sqrt(2) = #{root}")
IO.puts("my auto-session #{PoolBridge.current_session(DemoPy)} lives in slot #{PoolBridge.slot_for(DemoPy)}")

# A per-call session, and a process-scoped one: every call of a session runs in one worker.
{:ok, pid} = PoolBridge.call(DemoPy, "os.getpid", [], session: "user-7")

PoolBridge.with_session(DemoPy, "user-7", fn ->
  ^pid = PoolBridge.call!(DemoPy, "os.getpid")
  IO.puts("user-7 runs in worker #{pid} (slot #{PoolBridge.slot_for(DemoPy, "user-7")})")
end)

# Objects stay in the worker as refs; a ref routes itself.
{:ok, counter} = PoolBridge.create(DemoPy, "collections.Counter", ["mississippi"])
{:ok, top} = PoolBridge.method(DemoPy, counter, "most_common", [2])
IO.puts("most common letters: #{inspect(top)}")
{:ok, nil} = PoolBridge.release(DemoPy, counter)

# Streams are lazy Enumerables, pulled in batches, closed in Python when you stop early.
first =
  PoolBridge.stream(DemoPy, "builtins.range", [1_000_000], batch: 4) |> Stream.take(10) |> Enum.to_list()

IO.puts("streamed: #{inspect(first)}")

# Exact types: bytes stay bytes, NaN is an atom.
{:ok, digest} = PoolBridge.call(DemoPy, "hashlib.sha256", [PoolBridge.bytes(<<1, 2, 3>>)], ret: :ref)
IO.puts("sha256(<<1, 2, 3>>) = #{PoolBridge.method!(DemoPy, digest, "hexdigest")}")
{:ok, :nan} = PoolBridge.call(DemoPy, "builtins.float", ["nan"])

# Errors are values; a ref of another session is refused before anything is sent.
{:error, %PoolBridge.Error{code: code, type: type, message: message}} =
  PoolBridge.call(DemoPy, "math.sqrt", [-1.0])

IO.puts("math.sqrt(-1) -> #{code}: #{type}: #{message}")
{:ok, mine} = PoolBridge.create(DemoPy, "collections.Counter", [], session: "alice")

{:error, %PoolBridge.Error{code: :session_mismatch}} =
  PoolBridge.call(DemoPy, "builtins.len", [mine], session: "bob")

IO.puts("alice's ref in bob's session -> session_mismatch")

# Many processes, many requests in flight at once, each process in its own auto-session.
squares =
  1..100
  |> Task.async_stream(fn i -> PoolBridge.call!(DemoPy, "operator.mul", [i, i]) end)
  |> Enum.map(fn {:ok, v} -> v end)

IO.puts("sum of squares 1..100 = #{Enum.sum(squares)}")
Supervisor.stop(sup)
