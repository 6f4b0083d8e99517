defmodule PoolBridge.Session do
  @moduledoc """
  Where a session id comes from. `resolve/4` is the only function that decides one; every
  operation calls it once, and its result is the payload's `session` (which the server routes on
  and the worker stores refs under). Priority, highest first:

  1. the ref's own session (the target ref or stream of the operation) — a ref routes itself;
  2. the `session:` option of the call;
  3. the innermost `PoolBridge.with_session/3` of the calling process (nestable, restored on exit
     and on raise);
  4. the auto-session of the calling process: created lazily, one per process and pool instance,
     and closed in Python when the process exits (the pool's owner process monitors it).

  A `session:` option that disagrees with the ref's session is a `:session_mismatch`, returned here
  before anything is encoded. A ref of another session passed anywhere inside the arguments is
  refused by the encoder (`PoolBridge.Codec`) with the same code, also before anything is sent.

  Sessions given by `with_session/3` or `session:` belong to the application, which closes them
  (`PoolBridge.close_session/3`); only auto-sessions are closed by the pool.
  """

  alias PoolBridge.{Conn, Error, Options}

  @doc """
  Decide the session of one operation on `pool` (the term the caller passed, which keys
  `with_session/3`), given its target ref or stream (or nil) and the call's options.
  """
  @spec resolve(GenServer.server(), Conn.t(), %{session: String.t()} | nil, keyword()) ::
          {:ok, String.t()} | {:error, Error.t()}
  def resolve(pool, conn, target, opts) do
    override = Keyword.get(opts, :session)

    case target do
      %{session: own} when override == nil or override == own ->
        {:ok, own}

      %{session: own} ->
        {:error,
         Error.new(
           :session_mismatch,
           "the session: option #{inspect(override)} disagrees with the ref's session #{inspect(own)}"
         )}

      nil when override != nil ->
        {:ok, override}

      nil ->
        case Process.get({__MODULE__, :context, pool}) do
          [context | _] -> {:ok, context}
          _ -> {:ok, auto(conn)}
        end
    end
  end

  @doc "The innermost `with_session/3` session of this process for `pool`, if any."
  @spec context(GenServer.server()) :: String.t() | nil
  def context(pool) do
    case Process.get({__MODULE__, :context, pool}) do
      [context | _] -> context
      _ -> nil
    end
  end

  @doc "Run `fun` with `session` as this process's context session for `pool` (see `PoolBridge.with_session/3`)."
  @spec with_session(GenServer.server(), String.t(), (() -> result)) :: result when result: term()
  def with_session(pool, session, fun) when is_function(fun, 0) do
    unless Options.session?(session) do
      raise ArgumentError,
            "with_session expects a session id (1 to 256 UTF-8 bytes), got: #{inspect(session)}"
    end

    key = {__MODULE__, :context, pool}
    previous = Process.get(key)
    Process.put(key, [session | previous || []])

    try do
      fun.()
    after
      if previous == nil, do: Process.delete(key), else: Process.put(key, previous)
    end
  end

  # One auto-session per process and pool instance (the owner pid: a restarted pool gives the
  # process a new one, registered with the new owner). The id is random, so not guessable.
  defp auto(%Conn{owner: owner}) do
    key = {__MODULE__, :auto, owner}

    case Process.get(key) do
      nil ->
        session = "auto-" <> Base.encode16(:crypto.strong_rand_bytes(12), case: :lower)
        Process.put(key, session)
        PoolBridge.Server.watch(owner, self(), {:auto, session})
        session

      session ->
        session
    end
  end
end
