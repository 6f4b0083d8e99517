defmodule :telemetry do
  @moduledoc false
  # Test-only stand-in for the :telemetry library (not a dependency of this package): it forwards
  # each event to the process registered as :pool_bridge_telemetry_sink, if any. Its presence is
  # what PoolBridge.Telemetry.available?/0 detects, as it would detect the real library.
  def execute(event, measurements, metadata) do
    case Process.whereis(:pool_bridge_telemetry_sink) do
      nil -> :ok
      pid -> send(pid, {:telemetry, event, measurements, metadata})
    end

    :ok
  end
end
