# Elixir -> `python -m poolbridge serve`: the package's public API against the bare Port, same run.
#
#   cd examples/elixir && mix run ../../benchmarks/bench_port.exs [N]     (POOLBRIDGE_PYTHON picks Python)
#
# Rows (one Elixir process, a tiny call `operator.add [1, 2]` in session "bench", N per row,
# interleaved in 5 rounds so machine drift hits them alike):
#   raw echo   : a bare Port ({packet,4}, stdio) to benchmarks/_port_echo.py: one BEAM<->Python hop
#   bare port  : the same request on a bare Port to the server, encoded and read by this process
#   api call   : PoolBridge.call/4 (resolve, encode, ETS entry, Port.command, owner demux, decode)
#   api ping   : PoolBridge.ping/2 with the session (protocol 2: answered by the server itself)
# Then C concurrent callers (default 64) through PoolBridge.call/4, each in its own auto-session.
alias PoolBridge.Codec

defmodule Bench do
  def python, do: System.find_executable(System.get_env("POOLBRIDGE_PYTHON") || "python3")
  def repo, do: Path.expand("..", __DIR__)
  def env, do: [{~c"PYTHONPATH", String.to_charlist(repo())}]

  def port(args),
    do: Port.open({:spawn_executable, python()}, [{:args, args}, {:packet, 4}, :binary, {:env, env()}])

  def roundtrip(port, id) do
    ctx = %{session: "bench", epoch: nil, protocol: 2}
    fields = [{"op", "call"}, {"session", "bench"}, {"fn", "operator.add"}, {"args", [1, 2]}]
    Port.command(port, Codec.encode_request(id, fields, ctx))

    receive do
      {^port, {:data, data}} ->
        {:ok, %{"status" => "ok", "id" => ^id, "value" => 3}} = Codec.decode(data)
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

    :io.format("~-11s n=~w  median ~8.1f us   p90 ~8.1f us   p99 ~8.1f us~n", [
      name,
      n,
      pct.(0.5),
      pct.(0.9),
      pct.(0.99)
    ])

    pct.(0.5)
  end

  # The server's own capacity: one process keeps `window` requests in flight on a bare Port.
  def pipelined(port, total, window) do
    t0 = System.monotonic_time(:microsecond)
    for id <- 1..window, do: send_call(port, id)
    pump(port, window, total, 0)
    dt = System.monotonic_time(:microsecond) - t0
    round(total / (dt / 1_000_000))
  end

  defp pump(_port, _sent, total, total), do: :ok

  defp pump(port, sent, total, done) do
    receive do
      {^port, {:data, _}} ->
        if sent < total, do: send_call(port, sent + 1)
        pump(port, min(sent + 1, total), total, done + 1)
    after
      10_000 -> raise "no reply"
    end
  end

  defp send_call(port, id) do
    ctx = %{session: nil, epoch: nil, protocol: 2}
    session = "p#{rem(id, 64)}"
    fields = [{"op", "call"}, {"session", session}, {"fn", "operator.add"}, {"args", [1, 2]}]
    Port.command(port, Codec.encode_request(10_000_000 + id, fields, ctx))
  end

  def throughput(pool, callers, per) do
    t0 = System.monotonic_time(:microsecond)

    1..callers
    |> Task.async_stream(
      fn _ -> for _ <- 1..per, do: {:ok, 3} = PoolBridge.call(pool, "operator.add", [1, 2]) end,
      max_concurrency: callers,
      timeout: 300_000
    )
    |> Stream.run()

    dt = System.monotonic_time(:microsecond) - t0
    round(callers * per / (dt / 1_000_000))
  end
end

{n, callers} =
  case System.argv() do
    [x, c | _] -> {String.to_integer(x), String.to_integer(c)}
    [x] -> {String.to_integer(x), 64}
    _ -> {5000, 64}
  end

raw = Bench.port([Path.join(__DIR__, "_port_echo.py")])
bare = Bench.port(["-m", "poolbridge", "serve", "--workers", "2"])

receive do
  {^bare, {:data, _hello}} -> :ok
after
  30_000 -> raise "no hello"
end

{:ok, pool} = PoolBridge.start_link(workers: 2, python: Bench.python(), env: [{"PYTHONPATH", Bench.repo()}])
{:ok, info} = PoolBridge.info(pool)
api = fn _ -> {:ok, 3} = PoolBridge.call(pool, "operator.add", [1, 2], session: "bench") end
ping = fn _ -> {:ok, _} = PoolBridge.ping(pool, session: "bench") end

warm = max(div(n, 5), 1)
Bench.time(warm, &Bench.roundtrip(raw, &1))
Bench.time(warm, &Bench.roundtrip(bare, &1))
Bench.time(warm, api)
rounds = 5
per = max(div(n, rounds), 1)

{r, b, a, p} =
  Enum.reduce(1..rounds, {[], [], [], []}, fn k, {r, b, a, p} ->
    base = k * 1_000_000

    {Bench.time(per, &Bench.roundtrip(raw, base + &1)) ++ r,
     Bench.time(per, &Bench.roundtrip(bare, base + &1)) ++ b, Bench.time(per, api) ++ a,
     Bench.time(per, ping) ++ p}
  end)

{load, 0} = System.cmd("cat", ["/proc/loadavg"])

IO.puts(
  "poolbridge Port, tiny call (operator.add 1 2); protocol #{info.protocol}; " <>
    "#{System.schedulers_online()} schedulers; loadavg #{String.trim(load)}"
)

raw_med = Bench.summary("raw echo", r)
bare_med = Bench.summary("bare port", b)
api_med = Bench.summary("api call", a)
Bench.summary("api ping", p)
:io.format("ratio api call / bare port (median): ~.3fx   (target <= 1.15x)~n", [api_med / bare_med])
:io.format("ratio bare port / raw echo (median): ~.2fx~n", [bare_med / raw_med])

per_caller = max(div(n * 4, callers), 1)
total = callers * per_caller
# interleaved: bare pipelined, API, bare pipelined, API
[p1, a1, p2, a2] =
  for f <- [:bare, :api, :bare, :api] do
    if f == :bare,
      do: Bench.pipelined(bare, total, callers),
      else: Bench.throughput(pool, callers, per_caller)
  end

:io.format("bare port, ~w in flight from one process: ~w, ~w calls/s~n", [callers, p1, p2])

:io.format("concurrent: ~w callers x ~w calls through PoolBridge.call/4: ~w, ~w calls/s~n", [
  callers,
  per_caller,
  a1,
  a2
])

PoolBridge.close(pool)
Port.close(bare)
Port.close(raw)
