defmodule PoolBridge.Telemetry do
  @moduledoc """
  Telemetry spans `[:pool_bridge, :call, :start | :stop | :exception]` around every operation.

  Measurements: `system_time` (start), `duration` (stop/exception, native time units).
  Metadata: `pool`, `op` (the wire op, e.g. `"call"`), `session`, `slot`, and on stop `result`
  (`:ok` or `:error`) and `error` (the error code or nil); on exception `kind`, `reason`,
  `stacktrace`.

  `:telemetry` is not a dependency: events are emitted through it only when the application has
  it loaded (checked once when the pool starts); otherwise this is a no-op.
  """

  @doc "Whether `:telemetry` is available in this VM."
  @spec available?() :: boolean()
  def available?, do: Code.ensure_loaded?(:telemetry) and function_exported?(:telemetry, :execute, 3)

  @doc false
  @spec span(boolean(), map(), (() -> {:ok, term()} | {:error, PoolBridge.Error.t()})) ::
          {:ok, term()} | {:error, PoolBridge.Error.t()}
  def span(false, _meta, fun), do: fun.()

  def span(true, meta, fun) do
    start = System.monotonic_time()
    execute([:pool_bridge, :call, :start], %{system_time: System.system_time()}, meta)

    try do
      fun.()
    catch
      kind, reason ->
        duration = System.monotonic_time() - start
        meta = Map.merge(meta, %{kind: kind, reason: reason, stacktrace: __STACKTRACE__})
        execute([:pool_bridge, :call, :exception], %{duration: duration}, meta)
        :erlang.raise(kind, reason, __STACKTRACE__)
    else
      result ->
        duration = System.monotonic_time() - start

        stop_meta =
          case result do
            {:ok, _} -> %{result: :ok, error: nil}
            {:error, %{code: code}} -> %{result: :error, error: code}
          end

        execute([:pool_bridge, :call, :stop], %{duration: duration}, Map.merge(meta, stop_meta))
        result
    end
  end

  # apply/3 so the package compiles without warnings when :telemetry is absent.
  defp execute(event, measurements, meta), do: apply(:telemetry, :execute, [event, measurements, meta])
end
