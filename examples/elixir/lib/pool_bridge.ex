defmodule PoolBridge do
  @moduledoc """
  An Elixir client for poolbridge: a pool of Python worker processes with per-session affinity,
  spoken to through an Erlang Port (`python -m poolbridge serve`, docs/protocol.md).

      children = [{PoolBridge, name: MyPy, workers: 4, helpers: ["myapp.helpers"]}]

      {:ok, 1.4142135623730951} = PoolBridge.call(MyPy, "math.sqrt", [2.0])
      {:ok, ref} = PoolBridge.create(MyPy, "collections.Counter", ["abca"])
      {:ok, [["a", 2]]} = PoolBridge.method(MyPy, ref, "most_common", [1])

  ## Sessions

  Everything a session does runs in one worker process (`slot_for/2`), and objects (refs, streams)
  live there under that session. Each operation's session is decided once, by
  `PoolBridge.Session.resolve/4`: a ref's own session > the `session:` option > `with_session/3` >
  the calling process's auto-session (created lazily, closed in Python when the process exits).
  A `session:` that disagrees with a ref, or a ref of another session anywhere in the arguments, is
  `{:error, %PoolBridge.Error{code: :session_mismatch}}` before anything is sent.

  ## Results

  Every operation returns `{:ok, value}` or `{:error, %PoolBridge.Error{}}` and has a `!` variant
  that returns the value or raises. Values: see `PoolBridge.Codec` (valid UTF-8 binaries are
  Python `str`, `bytes/1` marks raw bytes; NaN/±Inf are `:nan`/`:infinity`/`:neg_infinity`;
  integers of any size; objects msgpack cannot carry come back as `%PoolBridge.Ref{}`).

  ## Call options

  * `:session` — run in this session (see above);
  * `:timeout` — ms or `:infinity`, default the pool's `:timeout` (5 000). On expiry the call
    returns `:timeout`, its reply is dropped and the request is cancelled in Python;
  * `:kwargs` — keyword arguments, a map or keyword list (`call`, `create`, `method`, `helper`, `stream`);
  * `:ret` — `:auto` (default), `:ref` (always a ref to the result) or `:value` (`call`, `getattr`,
    `get_attr`, `method`, `helper`);
  * `:batch` — stream items per round trip (`stream`);
  * `:when_busy` — `:wait` (default: block, within the timeout) or `:error` (return `:busy` at once)
    when the pool's `:max_pending` requests are in flight;
  * `:on_timeout` — `:keep` (default: a request already running finishes, its reply is dropped) or
    `:restart` (protocol 2: the server enforces the timeout and restarts the worker of a request
    still running at expiry — that slot's sessions lose their objects).

  ## Telemetry

  `[:pool_bridge, :call, :start | :stop | :exception]`, see `PoolBridge.Telemetry`.
  """

  alias PoolBridge.{Bytes, Client, Error, Options, Ref, Server, Session}

  @type pool :: GenServer.server()
  @type result :: {:ok, term()} | {:error, Error.t()}
  @type fun_ref :: String.t() | Ref.t()

  @common [:session, :timeout, :when_busy]
  @worker [:on_timeout | @common]

  # -- lifecycle ----------------------------------------------------------------------------------

  @doc """
  A child spec: `{PoolBridge, name: MyPy, workers: 4}` in a supervision tree. The pool is
  `:permanent`: when the Python server exits, the pool stops and its supervisor starts a new one.
  """
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts), do: Server.child_spec(opts)

  @doc """
  Start a pool linked to the caller. Returns at once: the server's hello is awaited in the
  background and calls made meanwhile wait for it.

  Options (checked here; a bad one raises `ArgumentError` naming it):

  * `:name` — register the pool (an atom, `{:global, term}` or `{:via, module, term}`);
  * `:workers` — worker processes (default: schedulers online);
  * `:python` — the Python executable (default `"python3"`), which must import `poolbridge`;
  * `:helpers` — modules whose `@poolbridge.helper` functions `helper/4` can call;
  * `:allow_modules` — allow-list patterns (`--allow-module`); `:server_args` — extra arguments;
  * `:env` — `[{"NAME", "value"}]` for the server; `:cd` — its working directory;
  * `:mode` — `:fds` (default: the Port on fds 3/4, stdout stays free) or `:stdio`;
  * `:timeout` — default per-call timeout in ms or `:infinity` (default 5 000);
  * `:max_pending` — bound on this client's requests in flight (default 10 000);
  * `:start_timeout` — ms to wait for the hello (default 30 000);
  * `:max_frame`, `:max_refs`, `:session_ttl` — passed to the server.
  """
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts), do: Server.start_link(opts)

  @doc "Stop the pool: the Port closes, the server stops its workers and exits."
  @spec close(pool()) :: :ok
  def close(pool), do: GenServer.stop(pool, :normal, 10_000)

  @doc """
  What the client knows about the running server: `protocol`, `epoch`, `slots`, `server_pid`,
  `worker_pids` (at start) and `pending` (this client's requests in flight).
  """
  @spec info(pool()) :: {:ok, map()} | {:error, Error.t()}
  def info(pool) do
    with {:ok, conn} <- Server.conn(pool, 5_000) do
      {:ok,
       %{
         protocol: conn.protocol,
         epoch: conn.epoch,
         slots: PoolBridge.Conn.slots(conn),
         server_pid: conn.hello["pid"],
         worker_pids: conn.hello["worker_pids"],
         pending: :atomics.get(conn.counters, 2)
       }}
    end
  end

  # -- values -------------------------------------------------------------------------------------

  @doc "Mark a binary as raw bytes (msgpack `bin`, Python `bytes`), even if it is valid UTF-8."
  @spec bytes(binary()) :: Bytes.t()
  def bytes(data) when is_binary(data), do: %Bytes{data: data}

  # -- sessions -----------------------------------------------------------------------------------

  @doc """
  Run `fun` with `session` as this process's session for `pool` (for calls given no `session:`
  and no ref). Nests; the previous session is restored when `fun` returns or raises. Key it by the
  same `pool` term (name or pid) the calls inside use.
  """
  @spec with_session(pool(), String.t(), (() -> result)) :: result when result: term()
  def with_session(pool, session, fun), do: Session.with_session(pool, session, fun)

  @doc "The session an operation of this process on `pool` would use now (given no ref and no `session:`)."
  @spec current_session(pool()) :: String.t()
  def current_session(pool) do
    case Session.context(pool) do
      nil ->
        {:ok, session} = Session.resolve(pool, conn!(pool), nil, [])
        session

      session ->
        session
    end
  end

  defp conn!(pool) do
    case Server.conn(pool, 5_000) do
      {:ok, conn} -> conn
      {:error, error} -> raise error
    end
  end

  @doc """
  The worker slot of `session` (default: `current_session/1`), computed in Elixir from
  docs/hashing.md — no round trip.
  """
  @spec slot_for(pool(), String.t() | nil) :: non_neg_integer()
  def slot_for(pool, session \\ nil) do
    PoolBridge.Hash.slot_for(session || current_session(pool), PoolBridge.Conn.slots(conn!(pool)))
  end

  @doc """
  Drop every ref, stream and helper state of a session in its worker; returns how many refs and
  streams went. `session` defaults to the current one (`with_session/3` or the auto-session).
  """
  @spec close_session(pool(), String.t() | nil, keyword()) :: result()
  def close_session(pool, session \\ nil, opts \\ []) do
    opts = Options.validate_call!(opts, @worker)
    opts = if session, do: Keyword.put(opts, :session, check_session!(session)), else: opts
    Client.run(pool, "close_session", nil, opts, fn _ -> [] end)
  end

  # -- operations ---------------------------------------------------------------------------------

  @doc "Call a function by dotted path (`\"math.sqrt\"`) or a callable ref, with `args` and `kwargs:`."
  @spec call(pool(), fun_ref(), list(), keyword()) :: result()
  def call(pool, fun, args \\ [], opts \\ []) when is_list(args) do
    opts = Options.validate_call!(opts, [:kwargs, :ret | @worker])

    Client.run(pool, "call", target(fun), opts, fn _ ->
      [{"fn", fun}, {"args", args}, {"kwargs", kwargs(opts)} | ret(opts)]
    end)
  end

  @doc "Read a module attribute by dotted path (`\"math.pi\"`)."
  @spec getattr(pool(), String.t(), keyword()) :: result()
  def getattr(pool, path, opts \\ []) when is_binary(path) do
    opts = Options.validate_call!(opts, [:ret | @worker])
    Client.run(pool, "getattr", nil, opts, fn _ -> [{"path", path} | ret(opts)] end)
  end

  @doc "Construct an object (class by dotted path or ref) and keep it in the worker: returns a `%PoolBridge.Ref{}`."
  @spec create(pool(), fun_ref(), list(), keyword()) :: result()
  def create(pool, class, args \\ [], opts \\ []) when is_list(args) do
    opts = Options.validate_call!(opts, [:kwargs | @worker])

    Client.run(pool, "create", target(class), opts, fn _ ->
      [{"fn", class}, {"args", args}, {"kwargs", kwargs(opts)}]
    end)
  end

  @doc "Call a method of the object behind a ref (in the ref's session)."
  @spec method(pool(), Ref.t(), String.t(), list(), keyword()) :: result()
  def method(pool, %Ref{} = ref, name, args \\ [], opts \\ []) when is_binary(name) and is_list(args) do
    opts = Options.validate_call!(opts, [:kwargs, :ret | @worker])

    Client.run(pool, "method", ref, opts, fn _ ->
      [{"target", ref}, {"name", name}, {"args", args}, {"kwargs", kwargs(opts)} | ret(opts)]
    end)
  end

  @doc "Read an attribute of the object behind a ref."
  @spec get_attr(pool(), Ref.t(), String.t(), keyword()) :: result()
  def get_attr(pool, %Ref{} = ref, name, opts \\ []) when is_binary(name) do
    opts = Options.validate_call!(opts, [:ret | @worker])
    Client.run(pool, "getattr", ref, opts, fn _ -> [{"target", ref}, {"name", name} | ret(opts)] end)
  end

  @doc "Set an attribute of the object behind a ref."
  @spec set_attr(pool(), Ref.t(), String.t(), term(), keyword()) :: result()
  def set_attr(pool, %Ref{} = ref, name, value, opts \\ []) when is_binary(name) do
    opts = Options.validate_call!(opts, @worker)
    Client.run(pool, "setattr", ref, opts, fn _ -> [{"target", ref}, {"name", name}, {"value", value}] end)
  end

  @doc "Call a `@poolbridge.helper` of a module given in the pool's `:helpers`."
  @spec helper(pool(), String.t(), list(), keyword()) :: result()
  def helper(pool, name, args \\ [], opts \\ []) when is_binary(name) and is_list(args) do
    opts = Options.validate_call!(opts, [:kwargs, :ret | @worker])

    Client.run(pool, "helper", nil, opts, fn _ ->
      [{"name", name}, {"args", args}, {"kwargs", kwargs(opts)} | ret(opts)]
    end)
  end

  @doc """
  Iterate `fun(*args, **kwargs)` in the worker, lazily, in batches (`batch:`). A `Stream`: see
  `PoolBridge.Stream` for when the session is decided, closing and errors (raised).

      PoolBridge.stream(MyPy, "builtins.range", [1_000_000]) |> Stream.take(10) |> Enum.to_list()
  """
  @spec stream(pool(), fun_ref(), list(), keyword()) :: Enumerable.t()
  def stream(pool, fun, args \\ [], opts \\ []) when is_list(args) do
    opts = Options.validate_call!(opts, [:kwargs, :batch | @worker])
    PoolBridge.Stream.new(pool, fun, args, opts)
  end

  @doc "Drop a ref in its worker."
  @spec release(pool(), Ref.t(), keyword()) :: result()
  def release(pool, %Ref{} = ref, opts \\ []) do
    opts = Options.validate_call!(opts, @worker)
    Client.run(pool, "release", ref, opts, fn _ -> [{"ref", ref}] end)
  end

  @doc """
  Ping the worker of the current session (or `session:`): `%{"slot", "generation", "pid", ...}`.
  With protocol 2 the server answers from its own state, never queued behind a busy worker.
  """
  @spec ping(pool(), keyword()) :: result()
  def ping(pool, opts \\ []) do
    opts = Options.validate_call!(opts, @common)
    Client.run(pool, "ping", nil, opts, fn _ -> [] end)
  end

  @doc """
  Grow or shrink the server's pool to `workers` slots while it serves (docs/protocol.md, `resize`).

  Returns the record: `%{"workers" => n, "old" => m, "moved" => [session], "lost" => %{session =>
  reason}, "refused" => bool, "failed_slots" => [...], "seconds" => s}`. Refs of moved sessions
  keep working; `slot_for/2` follows the new count once this returns. `on_unmovable: :refuse`
  changes nothing if any moving session cannot move. Default timeout: 60 s.
  """
  @spec resize(pool(), pos_integer(), keyword()) :: result()
  def resize(pool, workers, opts \\ []) when is_integer(workers) and workers > 0 do
    {on_unmovable, opts} = Keyword.pop(opts, :on_unmovable, :lose)
    opts = Options.validate_call!(opts, [:timeout])
    fields = [{"op", "resize"}, {"workers", workers}, {"on_unmovable", Atom.to_string(on_unmovable)}]

    with {:ok, conn} <- Server.conn(pool, 5_000) do
      Client.request(conn, fields, nil, Keyword.put_new(opts, :timeout, 60_000))
    end
  end

  @doc "A snapshot of every slot of the server (`%{\"workers\" => n, \"slots\" => [...]}`)."
  @spec stats(pool(), keyword()) :: result()
  def stats(pool, opts \\ []) do
    opts = Options.validate_call!(opts, [:timeout, :when_busy])
    Client.run_plain(pool, "stats", opts)
  end

  # -- bang variants ------------------------------------------------------------------------------

  @doc "Like `call/4`, returning the value or raising `PoolBridge.Error`."
  @spec call!(pool(), fun_ref(), list(), keyword()) :: term()
  def call!(pool, fun, args \\ [], opts \\ []), do: bang(call(pool, fun, args, opts))

  @doc "Like `getattr/3`, returning the value or raising `PoolBridge.Error`."
  @spec getattr!(pool(), String.t(), keyword()) :: term()
  def getattr!(pool, path, opts \\ []), do: bang(getattr(pool, path, opts))

  @doc "Like `create/4`, returning the ref or raising `PoolBridge.Error`."
  @spec create!(pool(), fun_ref(), list(), keyword()) :: Ref.t()
  def create!(pool, class, args \\ [], opts \\ []), do: bang(create(pool, class, args, opts))

  @doc "Like `method/5`, returning the value or raising `PoolBridge.Error`."
  @spec method!(pool(), Ref.t(), String.t(), list(), keyword()) :: term()
  def method!(pool, ref, name, args \\ [], opts \\ []), do: bang(method(pool, ref, name, args, opts))

  @doc "Like `get_attr/4`, returning the value or raising `PoolBridge.Error`."
  @spec get_attr!(pool(), Ref.t(), String.t(), keyword()) :: term()
  def get_attr!(pool, ref, name, opts \\ []), do: bang(get_attr(pool, ref, name, opts))

  @doc "Like `set_attr/5`, returning `nil` or raising `PoolBridge.Error`."
  @spec set_attr!(pool(), Ref.t(), String.t(), term(), keyword()) :: term()
  def set_attr!(pool, ref, name, value, opts \\ []), do: bang(set_attr(pool, ref, name, value, opts))

  @doc "Like `helper/4`, returning the value or raising `PoolBridge.Error`."
  @spec helper!(pool(), String.t(), list(), keyword()) :: term()
  def helper!(pool, name, args \\ [], opts \\ []), do: bang(helper(pool, name, args, opts))

  @doc "Like `release/3`, returning `nil` or raising `PoolBridge.Error`."
  @spec release!(pool(), Ref.t(), keyword()) :: term()
  def release!(pool, ref, opts \\ []), do: bang(release(pool, ref, opts))

  @doc "Like `close_session/3`, returning the count or raising `PoolBridge.Error`."
  @spec close_session!(pool(), String.t() | nil, keyword()) :: term()
  def close_session!(pool, session \\ nil, opts \\ []), do: bang(close_session(pool, session, opts))

  @doc "Like `ping/2`, returning the value or raising `PoolBridge.Error`."
  @spec ping!(pool(), keyword()) :: term()
  def ping!(pool, opts \\ []), do: bang(ping(pool, opts))

  @doc "Like `stats/2`, returning the value or raising `PoolBridge.Error`."
  @spec stats!(pool(), keyword()) :: term()
  def stats!(pool, opts \\ []), do: bang(stats(pool, opts))

  defp bang({:ok, value}), do: value
  defp bang({:error, %Error{} = error}), do: raise(error)

  # -- helpers ------------------------------------------------------------------------------------

  defp target(%Ref{} = ref), do: ref
  defp target(path) when is_binary(path), do: nil

  defp target(other),
    do: raise(ArgumentError, "expected a dotted path (string) or a %PoolBridge.Ref{}, got: #{inspect(other)}")

  defp check_session!(session) do
    if Options.session?(session),
      do: session,
      else: raise(ArgumentError, "invalid session id: #{inspect(session)}")
  end

  @doc false
  @spec kwargs(keyword()) :: map()
  def kwargs(opts) do
    case Keyword.get(opts, :kwargs, %{}) do
      map when is_map(map) -> map
      list -> Map.new(list, fn {k, v} -> {Atom.to_string(k), v} end)
    end
  end

  defp ret(opts) do
    case Keyword.get(opts, :ret) do
      nil -> []
      ret -> [{"ret", to_string(ret)}]
    end
  end
end
