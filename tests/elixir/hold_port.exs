# Used by tests/test_server_elixir.py: start a server through the client, print its pids, then
# wait forever — the test SIGKILLs this BEAM and checks that no Python process outlives it.
examples = Path.expand("../../examples/elixir", __DIR__)
Code.require_file("msgpack.ex", examples)
Code.require_file("pool_bridge.ex", examples)
Code.require_file("support.exs", __DIR__)

pb = PoolBridge.TestSupport.start()
hello = PoolBridge.hello(pb)
# a call in flight when the BEAM dies (the server answers the ping after it has read the call)
spawn(fn -> PoolBridge.call(pb, "held", "time.sleep", [60]) end)
# the client has written the call to the Port once it is pending there (bounded wait)
Enum.find(1..500, fn _ ->
  map_size(:sys.get_state(pb).pending) > 0 or (receive do after 10 -> false end)
end) || raise "the call never went out"
{:ok, _} = PoolBridge.ping(pb)
IO.puts("PIDS #{Enum.join([hello["pid"] | hello["worker_pids"]], " ")}")

receive do
after
  :infinity -> :ok
end
