defmodule PoolBridge.Client do
  @moduledoc false
  # The caller's side of one request, run in the calling process:
  #
  #   conn (cached) -> Session.resolve -> encode (checks every ref) -> pending bound -> monitor
  #   the owner with an alias -> ETS {id, alias} -> Port.command -> wait for {alias, frame} ->
  #   decode.
  #
  # On timeout the pending entry is taken back (so the owner drops the late reply), the alias is
  # deactivated and a `cancel` for the request is written; if the owner dies while we wait, the
  # monitor says so (:pool_closed).

  alias PoolBridge.{Codec, Conn, Error, Hash, Server, Session, Telemetry}

  @type result :: {:ok, term()} | {:error, Error.t()}

  @doc false
  # `target`: the ref/stream the op acts on (its session wins), or nil. `build` gets the resolved
  # session and returns the request's fields after "op" and "session".
  @spec run(GenServer.server(), String.t(), map() | nil, keyword(), (String.t() -> list())) :: result()
  def run(pool, op, target, opts, build) do
    with {:ok, conn} <- Server.conn(pool, Keyword.get(opts, :timeout, 5_000)),
         {:ok, session} <- Session.resolve(pool, conn, target, opts) do
      fields = [{"op", op}, {"session", session} | build.(session)]
      span(conn, pool, op, session, fn -> request(conn, fields, session, opts) end)
    end
  end

  @doc false
  # An op without a session (stats, a ping of the server itself).
  @spec run_plain(GenServer.server(), String.t(), keyword()) :: result()
  def run_plain(pool, op, opts) do
    with {:ok, conn} <- Server.conn(pool, Keyword.get(opts, :timeout, 5_000)) do
      span(conn, pool, op, nil, fn -> request(conn, [{"op", op}], nil, opts) end)
    end
  end

  defp span(%Conn{telemetry: false}, _pool, _op, _session, fun), do: fun.()

  defp span(conn, pool, op, session, fun) do
    slot = if session, do: Hash.slot_for(session, Conn.slots(conn))
    Telemetry.span(true, %{pool: pool, op: op, session: session, slot: slot}, fun)
  end

  @doc false
  @spec request(Conn.t(), list(), String.t() | nil, keyword()) :: result()
  def request(conn, fields, session, opts) do
    timeout = Keyword.get(opts, :timeout) || conn.default_timeout
    {fields, wait_ms} = server_timeout(fields, timeout, Keyword.get(opts, :on_timeout, :keep), conn)
    deadline = if timeout == :infinity, do: :infinity, else: now() + wait_ms
    id = Conn.next_id(conn)

    try do
      Codec.encode_request(id, fields, %{session: session, epoch: conn.epoch, protocol: conn.protocol})
    rescue
      e in Error -> {:error, e}
    else
      frame ->
        with :ok <- acquire(conn, Keyword.get(opts, :when_busy, :wait), deadline) do
          send_and_wait(conn, id, frame, session, deadline, timeout)
        end
    end
  end

  # on_timeout: :restart hands the deadline to the server (protocol 2), which answers `timeout`
  # itself and restarts the worker of a request still running; the client then waits a little
  # longer than the timeout for that answer, and cancels as usual if even that does not come.
  @server_grace_ms 2_000
  defp server_timeout(fields, timeout, :restart, %Conn{protocol: p}) when p >= 2 and is_integer(timeout) do
    {fields ++ [{"timeout", timeout / 1000}, {"on_timeout", "restart"}], timeout + @server_grace_ms}
  end

  defp server_timeout(fields, timeout, _on_timeout, _conn), do: {fields, timeout}

  defp send_and_wait(conn, id, frame, session, deadline, timeout) do
    reply_to = :erlang.monitor(:process, conn.owner, [{:alias, :demonitor}])

    written =
      try do
        :ets.insert(conn.table, {id, reply_to})
        Port.command(conn.port, frame)
      rescue
        ArgumentError -> false
      end

    if written do
      wait(conn, id, reply_to, session, deadline, timeout)
    else
      :erlang.demonitor(reply_to, [:flush])
      give_back(conn, id)
      Server.forget(conn)
      {:error, Error.new(:pool_closed, "the pool's Port is closed")}
    end
  end

  defp wait(conn, id, reply_to, session, deadline, timeout) do
    receive do
      {^reply_to, frame} ->
        :erlang.demonitor(reply_to, [:flush])
        decode(frame, conn)

      {:DOWN, ^reply_to, :process, _, reason} ->
        Server.forget(conn)
        {:error, Error.new(:pool_closed, "the pool stopped while waiting: #{inspect(reason, limit: 10)}")}
    after
      remaining(deadline) ->
        :erlang.demonitor(reply_to, [:flush])

        # Taking the entry back decides the race with the owner: if it is still there, no reply
        # will be delivered and the request is cancelled in Python; if not, the reply was sent to
        # the alias, now inactive, so it is dropped (or already here: flushed below).
        if give_back(conn, id), do: cancel(conn, id, session)

        receive do
          {^reply_to, _late} -> :ok
        after
          0 -> :ok
        end

        {:error, Error.new(:timeout, "no reply within #{timeout} ms (request #{id}; cancelled)")}
    end
  end

  defp give_back(conn, id) do
    case :ets.take(conn.table, id) do
      [_] ->
        :atomics.sub(conn.counters, 2, 1)
        GenServer.cast(conn.owner, :slot_freed)
        true

      [] ->
        false
    end
  rescue
    ArgumentError -> false
  end

  # Fire and forget: the owner drops the cancel's own reply (nobody waits for its id).
  defp cancel(%Conn{protocol: p} = conn, id, session) when p >= 2 do
    ctx = %{session: session, epoch: conn.epoch, protocol: p}
    Port.command(conn.port, Codec.encode_request(Conn.next_id(conn), [{"op", "cancel"}, {"target", id}], ctx))
  rescue
    ArgumentError -> false
  end

  defp cancel(_conn, _id, _session), do: false

  defp acquire(%Conn{counters: c, max_pending: max} = conn, when_busy, deadline) do
    if :atomics.add_get(c, 2, 1) <= max do
      :ok
    else
      :atomics.sub(c, 2, 1)

      case when_busy do
        :error ->
          {:error, Error.new(:busy, "#{max} requests are pending (max_pending); try again later")}

        :wait ->
          with :ok <- Server.wait_slot(conn.owner, remaining(deadline)), do: acquire(conn, :wait, deadline)
      end
    end
  end

  defp decode(frame, conn) do
    case Codec.ok_value(frame, conn.epoch) do
      {:ok, _} = ok -> ok
      :error -> decode_reply(frame, conn)
    end
  end

  defp decode_reply(frame, conn) do
    case Codec.decode(frame, conn.epoch) do
      {:ok, %{"status" => "ok"} = reply} -> {:ok, Map.get(reply, "value")}
      {:ok, %{"status" => "error", "error" => error}} when is_map(error) -> {:error, Error.from_wire(error)}
      other -> {:error, Error.new(:internal, "unreadable reply: #{inspect(other, limit: 10)}")}
    end
  end

  defp now, do: System.monotonic_time(:millisecond)
  defp remaining(:infinity), do: :infinity
  defp remaining(deadline), do: max(deadline - now(), 0)
end
