defmodule PoolBridge.BeamExitTest do
  @moduledoc "SIGKILL the BEAM that owns the Port: the server sees EOF and takes its workers with it."
  use ExUnit.Case, async: true
  import PoolBridge.TestSupport

  test "a killed BEAM leaves no Python process behind" do
    ebin = Path.join(:code.lib_dir(:pool_bridge), "ebin")
    script = Path.expand("scripts/hold_pool.exs", __DIR__)
    elixir = System.find_executable("elixir")

    port =
      Port.open({:spawn_executable, elixir}, [
        :binary,
        :exit_status,
        {:line, 4096},
        args: ["-pa", ebin, script]
      ])

    pids = read_pids(port, System.monotonic_time(:millisecond) + 60_000)
    [beam | python] = pids
    assert length(python) == 3
    assert Enum.all?(python, &(not gone?(&1)))
    System.cmd("kill", ["-9", to_string(beam)])
    assert_receive {^port, {:exit_status, _}}, 10_000
    assert wait_gone(python, 5_000) == []
  end

  defp read_pids(port, deadline) do
    receive do
      {^port, {:data, {:eol, "PIDS " <> pids}}} -> pids |> String.split() |> Enum.map(&String.to_integer/1)
      {^port, {:data, _other}} -> read_pids(port, deadline)
      {^port, {:exit_status, status}} -> flunk("the helper BEAM exited early with status #{status}")
    after
      max(deadline - System.monotonic_time(:millisecond), 0) -> flunk("no PIDS line from the helper BEAM")
    end
  end
end
