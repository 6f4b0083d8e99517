# Round-trip latency of a tiny call from Elixir through `python -m poolbridge serve`, against a
# raw Elixir<->Python Port echo measured in the same run.
#
#   elixir benchmarks/bench_port.exs [N]          (POOLBRIDGE_PYTHON picks the interpreter)
#
# raw echo      : Port ({packet,4}, stdio) to benchmarks/_port_echo.py — decode map, reply a+b
# server direct : Port to the server, the same request map, read by this process (no GenServer)
# server client : PoolBridge.call/4 through the example GenServer client (what an app uses)
# server ping   : Port to the server, {"op": "ping"} answered by the server itself (no worker hop):
#                 the BEAM<->server leg alone, to split the cost
# The request is the same map in the three call rows: call operator.add [1, 2] in session "bench".
examples = Path.expand("../examples/elixir", __DIR__)
Code.require_file("msgpack.ex", examples)
Code.require_file("pool_bridge.ex", examples)

defmodule Bench do
  def python, do: System.find_executable(System.get_env("POOLBRIDGE_PYTHON") || "python3")
  def env, do: [{~c"PYTHONPATH", String.to_charlist(Path.expand("..", __DIR__))}]

  def port(args), do: Port.open({:spawn_executable, python()}, [{:args, args}, {:packet, 4}, :binary, {:env, env()}])

  @call %{"op" => "call", "session" => "bench", "fn" => "operator.add", "args" => [1, 2]}

  def roundtrip(port, id, msg \\ @call) do
    Port.command(port, PoolBridge.Msgpack.encode_request(id, msg))
    receive do
      {^port, {:data, data}} ->
        {:ok, %{"status" => "ok", "id" => ^id}} = PoolBridge.Msgpack.decode(data)
        :ok
    after
      10_000 -> raise "no reply"
    end
  end

  def time(n, fun) do
    for i <- 1..n do
      t0 = System.monotonic_time(:nanosecond)
      fun.(i)
      System.monotonic_time(:nanosecond) - t0
    end
  end

  def summary(name, samples) do
    sorted = Enum.sort(samples)
    n = length(sorted)
    pct = fn p -> Enum.at(sorted, min(n - 1, trunc(p * n))) / 1000 end
    mean = Enum.sum(sorted) / n / 1000
    :io.format("~-15s n=~w  median ~8.1f us   p90 ~8.1f us   p99 ~8.1f us   mean ~8.1f us~n",
               [name, n, pct.(0.5), pct.(0.9), pct.(0.99), mean])
    pct.(0.5)
  end
end

n = case System.argv() do
  [x | _] -> String.to_integer(x)
  _ -> 5000
end
warm = div(n, 5)

raw = Bench.port([Path.join(__DIR__, "_port_echo.py")])
server = Bench.port(["-m", "poolbridge", "serve", "--workers", "2"])
receive do
  {^server, {:data, _hello}} -> :ok
after
  30_000 -> raise "no hello"
end
{:ok, pb} = PoolBridge.start_link(workers: 2, env: [{"PYTHONPATH", Path.expand("..", __DIR__)}])

# interleave the three in rounds so drift (CPU frequency, other load) hits them alike
rounds = 5
per = div(n, rounds)
Bench.time(warm, &Bench.roundtrip(raw, &1))
Bench.time(warm, &Bench.roundtrip(server, &1))
Bench.time(warm, fn _ -> {:ok, 3} = PoolBridge.call(pb, "bench", "operator.add", [1, 2]) end)

{r, s, c, p} =
  Enum.reduce(1..rounds, {[], [], [], []}, fn k, {r, s, c, p} ->
    base = k * 1_000_000
    {Bench.time(per, &Bench.roundtrip(raw, base + &1)) ++ r,
     Bench.time(per, &Bench.roundtrip(server, base + &1)) ++ s,
     Bench.time(per, fn _ -> {:ok, 3} = PoolBridge.call(pb, "bench", "operator.add", [1, 2]) end) ++ c,
     Bench.time(per, &Bench.roundtrip(server, base + 500_000 + &1, %{"op" => "ping"})) ++ p}
  end)

{load, 0} = System.cmd("cat", ["/proc/loadavg"])
IO.puts("poolbridge Port round trip, tiny call (operator.add 1 2); #{System.schedulers_online()} schedulers; loadavg #{String.trim(load)}")
raw_med = Bench.summary("raw echo", r)
srv_med = Bench.summary("server direct", s)
cli_med = Bench.summary("server client", c)
Bench.summary("server ping", p)
:io.format("ratio server direct / raw echo (median): ~.2fx~n", [srv_med / raw_med])
:io.format("ratio server client / raw echo (median): ~.2fx~n", [cli_med / raw_med])

# throughput with many callers: 16 processes x (n/16) calls through the GenServer client
callers = 16
t0 = System.monotonic_time(:microsecond)
1..callers
|> Task.async_stream(fn i ->
  for _ <- 1..div(n, callers), do: {:ok, 3} = PoolBridge.call(pb, "s#{i}", "operator.add", [1, 2])
end, max_concurrency: callers, timeout: 120_000)
|> Stream.run()
dt = System.monotonic_time(:microsecond) - t0
:io.format("concurrent: ~w callers, ~w calls in ~.1f ms = ~w calls/s~n",
           [callers, callers * div(n, callers), dt / 1000, round(callers * div(n, callers) / (dt / 1_000_000))])

PoolBridge.close(pb)
Port.close(server)
Port.close(raw)
