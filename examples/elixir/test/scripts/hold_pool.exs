# Run by beam_exit_test.exs in a BEAM of its own: start a pool, put a call in flight, print the
# OS pids (this BEAM, the server, its workers), then wait — the test SIGKILLs this BEAM.
pb = PoolBridge.TestSupport.start_pool(workers: 2)
{:ok, info} = PoolBridge.info(pb)
spawn(fn -> PoolBridge.call(pb, "time.sleep", [60], session: "held", timeout: :infinity) end)

PoolBridge.TestSupport.eventually(fn -> match?({:ok, %{pending: 1}}, PoolBridge.info(pb)) end) ||
  raise "the call never went out"

IO.puts("PIDS #{Enum.join([System.pid(), info.server_pid | info.worker_pids], " ")}")
Process.sleep(:infinity)
