defmodule PoolBridge do
  @moduledoc """
  A client for `python -m poolbridge serve`: one GenServer owns the Port, tags every request with
  an id, and replies to each caller when its reply arrives (replies come in completion order, so
  many requests from many processes are in flight at once).

  Copy this file and `msgpack.ex` into your app. Every function returns `{:ok, value}` or
  `{:error, %{code: atom | String.t(), message: String.t(), type: String.t(), traceback: String.t()}}`.

      {:ok, pb} = PoolBridge.start_link(workers: 4)
      {:ok, 1.4142135623730951} = PoolBridge.call(pb, "user-42", "math.sqrt", [2])
      {:ok, ref} = PoolBridge.create(pb, "user-42", "collections.Counter", ["hello"])
      {:ok, 2} = PoolBridge.method(pb, ref, "__getitem__", ["l"])

  Refs are opaque maps (`%{"__poolbridge_ref__" => [session, id, slot, generation]}`): pass them
  back unchanged. A ref routes itself, so calls on a ref need no session.

  Options of `start_link/1`: `:workers`, `:python` (executable, default `python3` on PATH),
  `:mode` (`:fds` — the default, Port `:nouse_stdio` with `--fds 3,4` — or `:stdio`),
  `:server_args` (extra CLI arguments, e.g. `["--allow-module", "math"]`), `:env`
  (`[{"NAME", "value"}]`), `:name`, `:start_timeout` (ms, default 30_000).
  """

  use GenServer

  alias PoolBridge.Msgpack

  @ref_tag "__poolbridge_ref__"
  @stream_tag "__poolbridge_stream__"
  @default_timeout 60_000
  @codes ~w(session_mismatch ref_not_found session_lost worker_crashed timeout bad_request
            frame_too_large not_allowed remote_error session_limit misrouted pool_closed busy internal)

  @type error :: %{code: atom() | String.t(), message: String.t(), type: String.t(), traceback: String.t()}
  @type result :: {:ok, term()} | {:error, error()}
  @type ref :: %{required(String.t()) => list()}

  # -- lifecycle ----------------------------------------------------------------------------

  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    {gen_opts, opts} = Keyword.split(opts, [:name])
    GenServer.start_link(__MODULE__, opts, gen_opts)
  end

  @doc "Close the Port: the server stops its workers and exits; in-flight callers get `:closed`."
  @spec close(GenServer.server()) :: :ok
  def close(server), do: GenServer.stop(server, :normal, 10_000)

  @doc "The hello frame the server sent on start (protocol, slots, pid, worker_pids, ...)."
  @spec hello(GenServer.server()) :: map()
  def hello(server), do: GenServer.call(server, :hello)

  # -- operations ---------------------------------------------------------------------------

  @doc "Call a function by dotted path (`\"math.sqrt\"`) or a callable ref. opts: `:ret` (\"auto\"|\"ref\"|\"value\"), `:timeout`."
  def call(server, session, fun, args \\ [], kwargs \\ %{}, opts \\ []) do
    request(server, with_ret(%{"op" => "call", "session" => session, "fn" => fun, "args" => args, "kwargs" => kwargs}, opts), opts)
  end

  @doc "Call a ref (a callable object held in the worker); the ref's own session is used."
  def call_ref(server, ref, args \\ [], kwargs \\ %{}, opts \\ []) do
    request(server, with_ret(%{"op" => "call", "fn" => ref, "args" => args, "kwargs" => kwargs}, opts), opts)
  end

  @doc "Construct an object in the session's worker and keep it there; returns a ref."
  def create(server, session, class, args \\ [], kwargs \\ %{}, opts \\ []) do
    request(server, %{"op" => "create", "session" => session, "fn" => class, "args" => args, "kwargs" => kwargs}, opts)
  end

  @doc "Read a module attribute by dotted path (`\"math.pi\"`)."
  def getattr(server, session, path, opts \\ []) do
    request(server, with_ret(%{"op" => "getattr", "session" => session, "path" => path}, opts), opts)
  end

  @doc "Read an attribute of the object behind a ref."
  def get_attr(server, ref, name, opts \\ []) do
    request(server, with_ret(%{"op" => "getattr", "target" => ref, "name" => name}, opts), opts)
  end

  @doc "Set an attribute of the object behind a ref."
  def set_attr(server, ref, name, value, opts \\ []) do
    request(server, %{"op" => "setattr", "target" => ref, "name" => name, "value" => value}, opts)
  end

  @doc "Call a method of the object behind a ref."
  def method(server, ref, name, args \\ [], kwargs \\ %{}, opts \\ []) do
    request(server, with_ret(%{"op" => "method", "target" => ref, "name" => name, "args" => args, "kwargs" => kwargs}, opts), opts)
  end

  @doc "Call a `@poolbridge.helper` registered in a module the server was started with (`--helpers`)."
  def helper(server, session, name, args \\ [], kwargs \\ %{}, opts \\ []) do
    request(server, with_ret(%{"op" => "helper", "session" => session, "name" => name, "args" => args, "kwargs" => kwargs}, opts), opts)
  end

  @doc "Open a stream over `fun(*args, **kwargs)`; returns `%{\"stream\" => s, \"items\" => [...], \"done\" => bool}`."
  def stream_open(server, session, fun, args \\ [], kwargs \\ %{}, opts \\ []) do
    msg = %{"op" => "stream_open", "session" => session, "fn" => fun, "args" => args, "kwargs" => kwargs}
    request(server, with_batch(msg, opts), opts)
  end

  @doc "The next batch of a stream: `%{\"items\" => [...], \"done\" => bool}`."
  def stream_next(server, stream, opts \\ []) do
    request(server, with_batch(%{"op" => "stream_next", "stream" => stream}, opts), opts)
  end

  @doc "Close a stream early (its generator is closed in the worker)."
  def stream_close(server, stream, opts \\ []) do
    request(server, %{"op" => "stream_close", "stream" => stream}, opts)
  end

  @doc "Collect a whole stream into a list (one round trip per batch)."
  def stream_to_list(server, session, fun, args \\ [], kwargs \\ %{}, opts \\ []) do
    with {:ok, %{"stream" => s, "items" => items, "done" => done}} <-
           stream_open(server, session, fun, args, kwargs, opts) do
      collect(server, s, done, [items], opts)
    end
  end

  defp collect(_server, _s, true, acc, _opts), do: {:ok, acc |> Enum.reverse() |> Enum.concat()}

  defp collect(server, s, false, acc, opts) do
    case stream_next(server, s, opts) do
      {:ok, %{"items" => items, "done" => done}} -> collect(server, s, done, [items | acc], opts)
      error -> error
    end
  end

  @doc "Drop a ref in its worker."
  def release(server, ref, opts \\ []), do: request(server, %{"op" => "release", "ref" => ref}, opts)

  @doc "Drop every ref, stream and helper state of a session; returns how many refs/streams went."
  def close_session(server, session, opts \\ []),
    do: request(server, %{"op" => "close_session", "session" => session}, opts)

  @doc "Ping the server (no session) or the session's worker (`%{\"slot\", \"generation\", \"pid\"}`)."
  def ping(server, session \\ nil, opts \\ []) do
    msg = if session, do: %{"op" => "ping", "session" => session}, else: %{"op" => "ping"}
    request(server, msg, opts)
  end

  def stats(server, opts \\ []), do: request(server, %{"op" => "stats"}, opts)
  def slot_for(server, session, opts \\ []), do: request(server, %{"op" => "slot_for", "session" => session}, opts)

  @doc "Is this value a ref (or a stream) handle?"
  def ref?(%{@ref_tag => [_, _, _, _]} = m) when map_size(m) == 1, do: true
  def ref?(_), do: false
  def stream?(%{@stream_tag => [_, _, _, _]} = m) when map_size(m) == 1, do: true
  def stream?(_), do: false

  @doc "Send any request map (the `id` is added here). opts: `:timeout` (ms, default 60_000)."
  @spec request(GenServer.server(), map(), keyword()) :: result()
  def request(server, msg, opts \\ []) do
    timeout = Keyword.get(opts, :timeout, @default_timeout)

    try do
      GenServer.call(server, {:request, msg}, timeout)
    catch
      :exit, {:timeout, _} -> {:error, error(:timeout, "no reply within #{timeout} ms")}
      :exit, reason -> {:error, error(:closed, "the poolbridge port is closed: #{inspect(reason)}")}
    end
  end

  defp with_ret(msg, opts) do
    case Keyword.get(opts, :ret) do
      nil -> msg
      ret -> Map.put(msg, "ret", to_string(ret))
    end
  end

  defp with_batch(msg, opts) do
    case Keyword.get(opts, :batch) do
      nil -> msg
      n -> Map.put(msg, "batch", n)
    end
  end

  defp error(code, message), do: %{code: code, message: message, type: "", traceback: ""}

  # -- the GenServer --------------------------------------------------------------------------

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    python = Keyword.get(opts, :python, System.get_env("POOLBRIDGE_PYTHON") || "python3")
    exe = System.find_executable(python) || python
    mode = Keyword.get(opts, :mode, :fds)
    workers = Keyword.get(opts, :workers, System.schedulers_online())
    args = ["-m", "poolbridge", "serve", "--workers", to_string(workers)] ++
             if(mode == :fds, do: ["--fds", "3,4"], else: []) ++ Keyword.get(opts, :server_args, [])
    env = for {k, v} <- Keyword.get(opts, :env, []), do: {String.to_charlist(k), String.to_charlist(v)}
    port_opts = [{:args, args}, {:packet, 4}, :binary, :exit_status, {:env, env}] ++
                  if(mode == :fds, do: [:nouse_stdio], else: [])
    port = Port.open({:spawn_executable, exe}, port_opts)
    timeout = Keyword.get(opts, :start_timeout, 30_000)

    receive do
      {^port, {:data, data}} ->
        {:ok, hello} = Msgpack.decode(data)
        {:ok, %{port: port, next: 1, pending: %{}, hello: hello}}

      {^port, {:exit_status, status}} ->
        {:stop, {:server_exited, status}}
    after
      timeout ->
        Port.close(port)
        {:stop, :no_hello}
    end
  end

  @impl true
  def handle_call(:hello, _from, state), do: {:reply, state.hello, state}

  def handle_call({:request, msg}, from, %{port: port, next: id} = state) do
    try do
      Port.command(port, Msgpack.encode_request(id, msg))
      {:noreply, %{state | next: id + 1, pending: Map.put(state.pending, id, from)}}
    rescue
      e in ArgumentError -> {:reply, {:error, error(:bad_request, Exception.message(e))}, state}
    end
  end

  @impl true
  def handle_info({port, {:data, data}}, %{port: port} = state) do
    case Msgpack.decode(data) do
      {:ok, %{"id" => id} = reply} when is_map_key(state.pending, id) ->
        {from, pending} = Map.pop(state.pending, id)
        GenServer.reply(from, to_result(reply))
        {:noreply, %{state | pending: pending}}

      {:ok, reply} ->
        # An error not tied to a request we know (an undecodable frame): nobody to tell.
        require Logger
        Logger.warning("poolbridge: unmatched reply #{inspect(reply, limit: 20)}")
        {:noreply, state}

      {:error, reason} ->
        {:stop, {:bad_frame, reason}, state}
    end
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    fail_all(state, "the poolbridge server exited with status #{status}")
    {:stop, {:shutdown, {:server_exited, status}}, %{state | port: nil, pending: %{}}}
  end

  def handle_info({:EXIT, port, reason}, %{port: port} = state) do
    fail_all(state, "the poolbridge port exited: #{inspect(reason)}")
    {:stop, {:shutdown, {:port_exited, reason}}, %{state | port: nil, pending: %{}}}
  end

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    fail_all(state, "the poolbridge client stopped")
    if state.port != nil, do: safe_close(state.port)
    :ok
  end

  defp safe_close(port) do
    Port.close(port)
  rescue
    ArgumentError -> :ok
  end

  defp fail_all(state, message) do
    for {_id, from} <- state.pending, do: GenServer.reply(from, {:error, error(:closed, message)})
  end

  defp to_result(%{"status" => "ok", "value" => value}), do: {:ok, value}

  defp to_result(%{"status" => "error", "error" => e}) do
    {:error,
     %{
       code: code(e["code"]),
       message: e["message"] || "",
       type: e["type"] || "",
       traceback: e["traceback"] || ""
     }}
  end

  defp to_result(other), do: {:error, error(:bad_reply, inspect(other))}

  defp code(c) when c in @codes, do: String.to_atom(c)
  defp code(c), do: c
end
