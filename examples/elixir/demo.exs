# Run from anywhere:  elixir examples/elixir/demo.exs
# (uses `python3`, or $POOLBRIDGE_PYTHON; poolbridge must be importable — the repo root is added
# to PYTHONPATH here so a checkout works without installing.)
Code.require_file("msgpack.ex", __DIR__)
Code.require_file("pool_bridge.ex", __DIR__)

repo = Path.expand("../..", __DIR__)
{:ok, pb} = PoolBridge.start_link(workers: 2, env: [{"PYTHONPATH", repo}])
hello = PoolBridge.hello(pb)
IO.puts("server pid #{hello["pid"]}, #{hello["slots"]} workers #{inspect(hello["worker_pids"])}")

# A plain call by dotted path, in session "alice".
{:ok, root} = PoolBridge.call(pb, "alice", "math.sqrt", [2])
IO.puts("math.sqrt(2) = #{root}")

# Every call of a session runs in one worker.
{:ok, %{"pid" => pid, "slot" => slot}} = PoolBridge.ping(pb, "alice")
IO.puts("alice lives in slot #{slot} (worker pid #{pid})")

# Objects stay in the worker as refs; a ref routes itself.
{:ok, counter} = PoolBridge.create(pb, "alice", "collections.Counter", ["mississippi"])
{:ok, top} = PoolBridge.method(pb, counter, "most_common", [2])
IO.puts("most common letters: #{inspect(top)}")
:ok = PoolBridge.release(pb, counter) |> elem(0)

# Streams arrive in batches.
{:ok, items} = PoolBridge.stream_to_list(pb, "alice", "builtins.range", [10], %{}, batch: 4)
IO.puts("streamed: #{inspect(items)}")

# Errors are values.
{:error, %{code: code, type: type, message: message}} = PoolBridge.call(pb, "alice", "math.sqrt", [-1])
IO.puts("math.sqrt(-1) -> #{code}: #{type}: #{message}")

# Many processes, many requests in flight at once.
results =
  1..100
  |> Task.async_stream(fn i -> PoolBridge.call(pb, "user-#{rem(i, 10)}", "operator.mul", [i, i]) end)
  |> Enum.map(fn {:ok, {:ok, v}} -> v end)
IO.puts("sum of squares 1..100 = #{Enum.sum(results)}")

PoolBridge.close(pb)
