defmodule PoolBridge.Server do
  @moduledoc """
  The owner of the Port to `python -m poolbridge serve`. It does three things only:

  * starts the server and waits for its hello without blocking `init/1` (callers that ask for the
    connection before the hello arrive are queued and answered once it does);
  * demultiplexes replies: it reads each reply's `id` (without decoding the rest) and forwards the
    raw frame to the waiting caller's alias, taken from the pending table — callers encode, write
    (`Port.command/2` from their own process) and decode themselves, so a large request or reply
    never stalls another caller;
  * monitors the processes that own an auto-session or an open stream, and closes those in Python
    when such a process exits.

  Why callers may write: `:erlang.port_command/2` may be called by any process, not only the port's
  connected process (only sending `{pid, {:command, data}}` messages requires being the owner), and
  each call hands the driver one whole packet — the `{packet, 4}` header is added per call — so
  frames of concurrent writers never interleave. A busy port suspends the writing caller, not the
  owner. Data *from* the port goes only to the connected process: hence the owner's demultiplexing.

  ```
  caller ──encode──▶ ETS {id, alias} ──Port.command──▶ python -m poolbridge serve ──▶ worker[slot]
     ▲                                                             │
     └──decode◀── send(alias, frame) ◀── owner: peek id, ets.take ◀┘ (replies in completion order)
  ```

  When the server exits the owner stops (`{:shutdown, {:server_exited, status}}`) and its
  supervisor starts a new one: a new server process with a new epoch, so every ref of the old one
  gives `:session_lost`.
  """

  use GenServer

  alias PoolBridge.{Codec, Conn, Error, Options}

  @doc false
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts) do
    %{id: Keyword.get(opts, :name, PoolBridge), start: {__MODULE__, :start_link, [opts]}, type: :worker}
  end

  @doc "Start the owner; options as in `PoolBridge.start_link/1` (validated here, raising `ArgumentError`)."
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts) do
    opts = Options.validate_pool!(opts)

    if System.find_executable(opts[:python]) == nil do
      raise ArgumentError, "invalid value for :python: #{inspect(opts[:python])} is not an executable on PATH"
    end

    case opts[:name] do
      nil -> GenServer.start_link(__MODULE__, opts)
      name -> GenServer.start_link(__MODULE__, opts, name: name)
    end
  end

  @doc false
  @spec conn(GenServer.server(), timeout()) :: {:ok, Conn.t()} | {:error, Error.t()}
  def conn(pool, timeout) do
    case GenServer.whereis(pool) do
      pid when is_pid(pid) ->
        case Process.get({Conn, pid}) do
          %Conn{} = conn ->
            {:ok, conn}

          nil ->
            with {:ok, conn} <- call(pid, :conn, timeout) do
              Process.put({Conn, pid}, conn)
              {:ok, conn}
            end
        end

      _ ->
        {:error, Error.new(:pool_closed, "no pool #{inspect(pool)} is running")}
    end
  end

  @doc false
  # Forget a cached connection whose owner is gone.
  @spec forget(Conn.t()) :: :ok
  def forget(%Conn{owner: owner}) do
    Process.delete({Conn, owner})
    :ok
  end

  @doc false
  @spec watch(pid(), pid(), {:auto, String.t()} | {:stream, PoolBridge.StreamRef.t()}) :: :ok
  def watch(owner, pid, what), do: GenServer.cast(owner, {:watch, pid, what})

  @doc false
  @spec unwatch(pid(), pid(), {:stream, PoolBridge.StreamRef.t()}) :: :ok
  def unwatch(owner, pid, what), do: GenServer.cast(owner, {:unwatch, pid, what})

  @doc false
  # Block until the pending count is below max_pending (or the timeout passes).
  @spec wait_slot(pid(), timeout()) :: :ok | {:error, Error.t()}
  def wait_slot(owner, timeout), do: call(owner, :wait_slot, timeout)

  defp call(pid, msg, timeout) do
    GenServer.call(pid, msg, timeout)
  catch
    :exit, {:timeout, _} -> {:error, Error.new(:timeout, "the pool did not answer within #{timeout} ms")}
    :exit, reason -> {:error, Error.new(:pool_closed, "the pool stopped: #{inspect(reason, limit: 10)}")}
  end

  # -- the GenServer ----------------------------------------------------------------------------

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    table = :ets.new(:pool_bridge_pending, [:set, :public, write_concurrency: true])
    counters = :atomics.new(3, signed: true)

    state = %{
      opts: opts,
      table: table,
      counters: counters,
      port: nil,
      conn: nil,
      queued: [],
      waiters: :queue.new(),
      watched: %{},
      timer: nil
    }

    {:ok, state, {:continue, :open}}
  end

  @impl true
  def handle_continue(:open, %{opts: opts} = state) do
    port = Port.open({:spawn_executable, System.find_executable(opts[:python])}, port_options(opts))
    timer = Process.send_after(self(), :hello_timeout, opts[:start_timeout])
    {:noreply, %{state | port: port, timer: timer}}
  end

  defp port_options(opts) do
    fds = opts[:mode] == :fds

    args =
      ["-m", "poolbridge", "serve", "--workers", to_string(opts[:workers])] ++
        if(fds, do: ["--fds", "3,4"], else: []) ++
        Enum.flat_map(opts[:helpers], &["--helpers", &1]) ++
        Enum.flat_map(opts[:allow_modules], &["--allow-module", &1]) ++
        flag("--max-frame", opts[:max_frame]) ++
        flag("--max-refs", opts[:max_refs]) ++
        flag("--session-ttl", opts[:session_ttl]) ++ opts[:server_args]

    env = for {k, v} <- opts[:env], do: {String.to_charlist(k), String.to_charlist(v)}

    # parallelism: many callers write to this port at once; with the hint, a write that finds the
    # port busy is scheduled as a port task instead of contending for its lock (benchmarks/PORT.md).
    [{:args, args}, {:packet, 4}, :binary, :exit_status, {:env, env}, {:parallelism, true}] ++
      if(fds, do: [:nouse_stdio], else: []) ++
      if(opts[:cd], do: [{:cd, opts[:cd]}], else: [])
  end

  defp flag(_name, nil), do: []
  defp flag(name, value), do: [name, to_string(value)]

  @impl true
  def handle_call(:conn, _from, %{conn: %Conn{} = conn} = state), do: {:reply, {:ok, conn}, state}
  def handle_call(:conn, from, state), do: {:noreply, %{state | queued: [from | state.queued]}}

  def handle_call(:wait_slot, from, state) do
    if :atomics.get(state.counters, 2) < state.opts[:max_pending] do
      {:reply, :ok, state}
    else
      {:noreply, %{state | waiters: :queue.in(from, state.waiters)}}
    end
  end

  @impl true
  def handle_cast({:watch, pid, what}, state) do
    entry =
      case state.watched do
        %{^pid => entry} -> entry
        _ -> %{monitor: Process.monitor(pid), autos: [], streams: %{}}
      end

    entry =
      case what do
        {:auto, session} -> %{entry | autos: [session | entry.autos]}
        {:stream, s} -> %{entry | streams: Map.put(entry.streams, {s.session, s.id}, s)}
      end

    {:noreply, %{state | watched: Map.put(state.watched, pid, entry)}}
  end

  def handle_cast({:unwatch, pid, {:stream, s}}, state) do
    case state.watched do
      %{^pid => entry} ->
        entry = %{entry | streams: Map.delete(entry.streams, {s.session, s.id})}
        {:noreply, %{state | watched: Map.put(state.watched, pid, entry)}}

      _ ->
        {:noreply, state}
    end
  end

  def handle_cast(:slot_freed, state), do: {:noreply, wake(state)}

  @impl true
  def handle_info({port, {:data, frame}}, %{port: port, conn: nil} = state), do: hello(frame, state)

  def handle_info({port, {:data, frame}}, %{port: port} = state) do
    case Codec.peek_id(frame) do
      {:ok, id} -> {:noreply, deliver(id, frame, state)}
      :error -> {:noreply, unmatched(frame, state)}
    end
  end

  def handle_info({:DOWN, _ref, :process, pid, _reason}, state) do
    case Map.pop(state.watched, pid) do
      {nil, _} ->
        {:noreply, state}

      {entry, watched} ->
        # The process is gone, so every frame it wrote is already in the Port ahead of these.
        for s <- entry.autos, do: send_frame(state, [{"op", "close_session"}, {"session", s}], s)
        for {_, s} <- entry.streams, do: send_frame(state, [{"op", "stream_close"}, {"stream", s}], s.session)
        {:noreply, %{state | watched: watched}}
    end
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    {:stop, {:shutdown, {:server_exited, status}}, %{state | port: nil}}
  end

  def handle_info({:EXIT, port, reason}, %{port: port} = state) do
    {:stop, {:shutdown, {:port_exited, reason}}, %{state | port: nil}}
  end

  def handle_info(:hello_timeout, %{conn: nil} = state) do
    fail_queued(state, "no hello from the server within #{state.opts[:start_timeout]} ms")
    {:stop, {:shutdown, :no_hello}, state}
  end

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    fail_queued(state, "the pool stopped before the server was ready")

    if state.port != nil do
      try do
        Port.close(state.port)
      rescue
        ArgumentError -> :ok
      end
    end

    :ok
  end

  defp hello(frame, state) do
    case Codec.decode(frame) do
      {:ok, %{"hello" => "poolbridge", "protocol" => protocol, "slots" => slots} = hello} ->
        Process.cancel_timer(state.timer)
        opts = state.opts

        conn = %Conn{
          owner: self(),
          port: state.port,
          table: state.table,
          counters: state.counters,
          max_pending: opts[:max_pending],
          slots: slots,
          # A protocol 1 server has no epoch: this client makes one per server process, so its
          # refs still cannot outlive the server (the check is then the client's alone).
          epoch: Map.get(hello, "epoch") || Base.encode16(:crypto.strong_rand_bytes(8), case: :lower),
          protocol: protocol,
          hello: hello,
          default_timeout: opts[:timeout],
          telemetry: PoolBridge.Telemetry.available?()
        }

        # Counter 3: the slot count, which a `resized` notice changes while callers hold this conn.
        :atomics.put(state.counters, 3, slots)
        for from <- state.queued, do: GenServer.reply(from, {:ok, conn})
        {:noreply, %{state | conn: conn, queued: []}}

      other ->
        fail_queued(state, "the server's first frame is not a poolbridge hello")
        {:stop, {:shutdown, {:bad_hello, other}}, state}
    end
  end

  defp fail_queued(state, message) do
    for from <- state.queued, do: GenServer.reply(from, {:error, Error.new(:pool_closed, message)})
  end

  # The fast path: the id read without decoding. A frame whose id cannot be peeked (not written
  # id-first) is decoded in full, once, to find it.
  defp deliver(id, frame, state) do
    case :ets.take(state.table, id) do
      [{_id, reply_to}] ->
        send(reply_to, {reply_to, frame})
        :atomics.sub(state.counters, 2, 1)
        wake(state)

      [] ->
        unmatched(frame, state)
    end
  end

  # A reply nobody waits for: the answer to a cancel, close_session or stream_close this process
  # sent, or a reply that came after its caller gave up. A stream opened that late is closed.
  defp unmatched(frame, state) do
    case Codec.decode(frame, state.conn.epoch) do
      {:ok, %{"id" => id}} = decoded when id != nil ->
        if :ets.member(state.table, id),
          do: deliver(id, frame, state),
          else: close_late_stream(decoded, state)

      # The server was resized (docs/hashing.md): slot_for follows the new count from now on.
      # It comes before the resize's reply, so a caller holding that reply sees the new count.
      {:ok, %{"notice" => "resized", "slots" => slots}} when is_integer(slots) and slots > 0 ->
        :atomics.put(state.counters, 3, slots)
        %{state | conn: %{state.conn | slots: slots}}

      {:ok, %{"notice" => _}} ->
        state

      _ ->
        state
    end
  end

  defp close_late_stream({:ok, reply}, state) do
    with %{"status" => "ok", "value" => %{"stream" => %PoolBridge.StreamRef{} = s}} <- reply do
      send_frame(state, [{"op", "stream_close"}, {"stream", s}], s.session)
    end

    state
  end

  defp wake(state) do
    if :queue.is_empty(state.waiters) or :atomics.get(state.counters, 2) >= state.opts[:max_pending] do
      state
    else
      {{:value, from}, rest} = :queue.out(state.waiters)
      GenServer.reply(from, :ok)
      wake_dead(%{state | waiters: rest}, from)
    end
  end

  # A waiter that already gave up took nothing: keep waking until a live one got the slot.
  defp wake_dead(state, {pid, _}) do
    if Process.alive?(pid), do: state, else: wake(state)
  end

  defp send_frame(%{conn: conn, port: port}, fields, session) when port != nil do
    ctx = %{session: session, epoch: conn.epoch, protocol: conn.protocol}

    try do
      Port.command(port, Codec.encode_request(Conn.next_id(conn), fields, ctx))
    rescue
      _ -> :ok
    end

    :ok
  end

  defp send_frame(_state, _fields, _session), do: :ok
end
