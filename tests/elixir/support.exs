defmodule PoolBridge.TestSupport do
  @moduledoc "Starting servers for tests, and checking OS processes through /proc."

  @repo Path.expand("../..", __DIR__)

  def env do
    path = Enum.join([@repo, __DIR__ | List.wrap(System.get_env("PYTHONPATH"))], ":")
    [{"PYTHONPATH", path}]
  end

  def start(opts \\ []) do
    opts =
      Keyword.merge(
        [workers: 2, env: env(), server_args: ["--helpers", "pb_test_helpers"]],
        opts,
        fn
          :server_args, a, b -> a ++ b
          _k, _a, b -> b
        end
      )

    {:ok, pb} = GenServer.start(PoolBridge, opts)
    pb
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

  @doc "Wait (bounded) until every pid is gone; returns the ones still alive."
  def wait_gone(pids, timeout_ms \\ 3000) do
    deadline = System.monotonic_time(:millisecond) + timeout_ms
    do_wait_gone(pids, deadline)
  end

  defp do_wait_gone(pids, deadline) do
    alive = Enum.reject(pids, &gone?/1)

    cond do
      alive == [] -> []
      System.monotonic_time(:millisecond) > deadline -> alive
      true ->
        receive do
        after
          20 -> do_wait_gone(alive, deadline)
        end
    end
  end

  def pair_of_sessions_on_different_slots(pb) do
    Enum.reduce_while(0..100, %{}, fn i, acc ->
      s = "k#{i}"
      {:ok, slot} = PoolBridge.slot_for(pb, s)
      acc = Map.put_new(acc, slot, s)
      if map_size(acc) == 2, do: {:halt, acc}, else: {:cont, acc}
    end)
  end
end
