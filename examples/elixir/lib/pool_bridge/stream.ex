defmodule PoolBridge.Stream do
  @moduledoc """
  `PoolBridge.stream/4`: a Python iterator as a lazy `Enumerable`, pulled in batches.

  Nothing is sent until enumeration starts; the session is resolved then, in the enumerating
  process (`PoolBridge.Session.resolve/4`). Each batch is one round trip (`batch:` items, default
  256). When the consumer halts early (`Enum.take/2`, `Stream.take/2`, a raise) the generator is
  closed in Python (`stream_close`: its `finally` blocks run); when the enumerating process dies
  mid-stream, the pool's owner closes it. Errors — from Python or from the pool — are raised as
  `PoolBridge.Error`, since an `Enumerable` has no error tuple.
  """

  alias PoolBridge.{Client, Error, Server, StreamRef}

  @doc false
  @spec new(GenServer.server(), String.t() | PoolBridge.Ref.t(), list(), keyword()) :: Enumerable.t()
  def new(pool, fun, args, opts) do
    Stream.resource(fn -> open(pool, fun, args, opts) end, &next(&1, opts), &close/1)
  end

  defp open(pool, fun, args, opts) do
    target = if is_struct(fun, PoolBridge.Ref), do: fun

    build = fn _session ->
      [{"fn", fun}, {"args", args}, {"kwargs", PoolBridge.kwargs(opts)}] ++ batch(opts)
    end

    case Client.run(pool, "stream_open", target, opts, build) do
      {:ok, %{"stream" => %StreamRef{} = stream, "items" => items, "done" => done}} ->
        owner = GenServer.whereis(pool)
        unless done, do: Server.watch(owner, self(), {:stream, stream})
        %{pool: pool, owner: owner, stream: stream, items: items, done: done}

      {:ok, other} ->
        raise Error.new(:internal, "unexpected stream_open reply: #{inspect(other, limit: 10)}")

      {:error, error} ->
        raise error
    end
  end

  defp next(%{items: [_ | _] = items} = state, _opts), do: {items, %{state | items: []}}
  defp next(%{done: true} = state, _opts), do: {:halt, state}

  defp next(%{stream: stream} = state, opts) do
    case Client.run(state.pool, "stream_next", stream, opts, fn _ -> [{"stream", stream} | batch(opts)] end) do
      {:ok, %{"items" => items, "done" => done}} ->
        if done, do: Server.unwatch(state.owner, self(), {:stream, stream})
        {items, %{state | done: done}}

      {:error, error} ->
        # The stream is gone in Python once it raised; nothing left to close.
        Server.unwatch(state.owner, self(), {:stream, stream})
        raise error
    end
  end

  defp close(%{done: true}), do: :ok

  defp close(%{stream: stream} = state) do
    Client.run(state.pool, "stream_close", stream, [], fn _ -> [{"stream", stream}] end)
    Server.unwatch(state.owner, self(), {:stream, stream})
    :ok
  end

  defp batch(opts) do
    case Keyword.get(opts, :batch) do
      nil -> []
      n -> [{"batch", n}]
    end
  end
end
