defmodule PoolBridge.TestSupport do
  @moduledoc "Starting pools against the real server of this checkout, and bounded waits."

  @repo Path.expand("../../../..", __DIR__)
  # The Python side of the tests: tests/elixir/pb_test_helpers.py, shared with the Python Port tests.
  @support Path.join(@repo, "tests/elixir")

  @doc "The server's environment: this checkout's poolbridge and the test helpers importable."
  def env do
    path = Enum.join([@repo, @support | List.wrap(System.get_env("PYTHONPATH"))], ":")
    [{"PYTHONPATH", path}]
  end

  def python, do: System.get_env("POOLBRIDGE_PYTHON") || "python3"

  def pool_opts(opts \\ []) do
    Keyword.merge([workers: 2, python: python(), env: env(), helpers: ["pb_test_helpers"]], opts)
  end

  @doc "Start a pool linked to the test process (stopped with it)."
  def start_pool(opts \\ []) do
    {:ok, pid} = PoolBridge.start_link(pool_opts(opts))
    {:ok, _info} = PoolBridge.info(pid)
    pid
  end

  @doc "Start a pool not linked to the caller (for a setup_all shared by tests)."
  def start_shared(opts) do
    {:ok, pid} =
      GenServer.start(PoolBridge.Server, PoolBridge.Options.validate_pool!(pool_opts(opts)), name: opts[:name])

    {:ok, _info} = PoolBridge.info(pid)
    pid
  end

  @doc "Stop a pool and check its server and workers are gone."
  def stop_pool(pool) do
    {:ok, info} = PoolBridge.info(pool)
    PoolBridge.close(pool)
    [] = wait_gone([info.server_pid | info.worker_pids])
    :ok
  end

  @doc "Poll `fun` until it returns a truthy value (bounded); returns it, or nil after `timeout_ms`."
  def eventually(fun, timeout_ms \\ 5_000) do
    deadline = System.monotonic_time(:millisecond) + timeout_ms
    do_eventually(fun, deadline)
  end

  defp do_eventually(fun, deadline) do
    case fun.() do
      result when result not in [nil, false] ->
        result

      _ ->
        if System.monotonic_time(:millisecond) > deadline do
          nil
        else
          Process.sleep(10)
          do_eventually(fun, deadline)
        end
    end
  end

  @doc "True if the OS process is gone (or a zombie awaiting its parent)."
  def gone?(pid) do
    case File.read("/proc/#{pid}/stat") do
      {:ok, stat} ->
        [_, after_comm] = String.split(stat, ") ", parts: 2)
        String.starts_with?(after_comm, "Z")

      {:error, _} ->
        true
    end
  end

  @doc "Wait (bounded) until every OS pid is gone; returns the ones still alive."
  def wait_gone(pids, timeout_ms \\ 5_000) do
    eventually(fn -> Enum.all?(pids, &gone?/1) end, timeout_ms)
    Enum.reject(pids, &gone?/1)
  end

  @doc "One session id per slot: %{slot => session}."
  def sessions_by_slot(pool, prefix \\ "k") do
    {:ok, %{slots: n}} = PoolBridge.info(pool)

    Enum.reduce_while(0..10_000, %{}, fn i, acc ->
      s = "#{prefix}#{i}"
      acc = Map.put_new(acc, PoolBridge.slot_for(pool, s), s)
      if map_size(acc) == n, do: {:halt, acc}, else: {:cont, acc}
    end)
  end
end
