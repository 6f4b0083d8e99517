# Runs the Elixir suite with plain `elixir` (no Mix, no Hex):  elixir tests/elixir/run.exs
# Exit status 0 when every test passes. Invoked from pytest by tests/test_server_elixir.py.
examples = Path.expand("../../examples/elixir", __DIR__)
Code.require_file("msgpack.ex", examples)
Code.require_file("pool_bridge.ex", examples)
Code.require_file("support.exs", __DIR__)

ExUnit.start(autorun: false, timeout: 30_000, max_cases: 4)

for file <- Path.wildcard(Path.join(__DIR__, "*_test.exs")), do: Code.require_file(file)

%{failures: failures, total: total} = ExUnit.run()
IO.puts("elixir suite: #{total} tests, #{failures} failures")
System.halt(if failures == 0 and total > 0, do: 0, else: 1)
