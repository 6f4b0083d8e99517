defmodule PoolBridge.SupervisionTest do
  @moduledoc "child_spec/start_link, option errors, a non-blocking start, restarts, closing."
  use ExUnit.Case, async: true
  import PoolBridge.TestSupport
  alias PoolBridge.Error

  test "options are checked with errors that name the option" do
    for {opts, pattern} <- [
          {[workers: 0], ~r/invalid value for :workers.*positive integer.*got: 0/},
          {[wokers: 2], ~r/unknown option :wokers.*known options: :name, :workers/},
          {[mode: :pipe], ~r/:mode.*:fds .*or :stdio/},
          {[timeout: -1], ~r/:timeout/},
          {[env: [{"A", 1}]], ~r/:env/},
          {[python: "no-such-python-exe"], ~r/:python.*not an executable/},
          {:not_a_list, ~r/keyword list/}
        ] do
      assert_raise ArgumentError, pattern, fn -> PoolBridge.start_link(opts) end
    end

    pb = start_pool(workers: 1)

    assert_raise ArgumentError, ~r/unknown option :sesion/, fn ->
      PoolBridge.call(pb, "os.getpid", [], sesion: "x")
    end

    assert_raise ArgumentError, ~r/:batch/, fn -> PoolBridge.call(pb, "os.getpid", [], batch: 3) end
    stop_pool(pb)
  end

  test "start_link returns before the hello; calls made meanwhile wait for it" do
    {:ok, pb} = PoolBridge.start_link(pool_opts(workers: 1))
    # the owner answers :sys messages at once: init and handle_continue did not wait for Python
    assert %{conn: nil} = :sys.get_state(pb)
    assert {:ok, 3} = PoolBridge.call(pb, "operator.add", [1, 2], timeout: 30_000)
    stop_pool(pb)
  end

  test "a named pool under a supervisor; the server's exit restarts it and old refs are :session_lost" do
    name = :"sup_pool_#{System.unique_integer([:positive])}"

    {:ok, sup} =
      Supervisor.start_link([{PoolBridge, pool_opts(name: name, workers: 2)}], strategy: :one_for_one)

    assert {:ok, info} = PoolBridge.info(name)
    ref = PoolBridge.create!(name, "pb_test_helpers.Box", [1], session: "sup")
    owner = GenServer.whereis(name)

    System.cmd("kill", ["-9", to_string(info.server_pid)])
    assert eventually(fn -> GenServer.whereis(name) not in [nil, owner] end, 10_000)
    assert {:ok, new_info} = PoolBridge.info(name)
    assert new_info.epoch != info.epoch
    assert wait_gone([info.server_pid | info.worker_pids]) == []

    assert {:error, %Error{code: :session_lost}} = PoolBridge.method(name, ref, "get")
    assert {:error, %Error{code: :session_lost}} = PoolBridge.call(name, "builtins.id", [ref], session: "sup")
    assert {:ok, 5} = PoolBridge.call(name, "operator.add", [2, 3], session: "sup")
    Supervisor.stop(sup)
    assert wait_gone([new_info.server_pid | new_info.worker_pids]) == []
  end

  test "a server that exits before its hello: callers get :pool_closed, never a hang" do
    opts = PoolBridge.Options.validate_pool!(pool_opts(python: "false"))
    {:ok, pid} = GenServer.start(PoolBridge.Server, opts)
    assert {:error, %Error{code: :pool_closed}} = PoolBridge.call(pid, "os.getpid", [], timeout: 10_000)
  end

  test "the pool closed mid-call: the caller gets :pool_closed and no process is left behind" do
    pb = start_pool()
    {:ok, info} = PoolBridge.info(pb)
    task = Task.async(fn -> PoolBridge.call(pb, "time.sleep", [30], session: "sleeper", timeout: 60_000) end)
    assert eventually(fn -> match?({:ok, %{pending: 1}}, PoolBridge.info(pb)) end)
    PoolBridge.close(pb)
    assert {:error, %Error{code: :pool_closed}} = Task.await(task, 10_000)
    assert wait_gone([info.server_pid | info.worker_pids]) == []
    assert {:error, %Error{code: :pool_closed}} = PoolBridge.call(pb, "os.getpid")
  end

  test "stdio mode: prints and fd-1 writes in user code never corrupt a frame" do
    pb = start_pool(mode: :stdio, workers: 1)

    for _ <- 1..3 do
      assert {:ok, "noise"} = PoolBridge.helper(pb, "noisy", ["noise"])
      assert {:ok, 9} = PoolBridge.call(pb, "os.write", [1, PoolBridge.bytes(<<0, 0, 0, 5, "hello">>)])
    end

    assert {:ok, 3} = PoolBridge.call(pb, "operator.add", [1, 2])
    stop_pool(pb)
  end

  test "server options: frame_too_large then it keeps serving; the allow-list" do
    pb = start_pool(max_frame: 1000, workers: 1, allow_modules: ["math", "builtins", "pb_test_*"])

    assert {:error, %Error{code: :frame_too_large}} =
             PoolBridge.call(pb, "builtins.len", [String.duplicate("x", 5000)])

    assert {:ok, 500} = PoolBridge.call(pb, "builtins.len", [String.duplicate("x", 500)])
    assert {:ok, 2.0} = PoolBridge.call(pb, "math.sqrt", [4])
    assert {:error, %Error{code: :not_allowed}} = PoolBridge.call(pb, "os.system", ["true"])
    assert {:error, %Error{code: :not_allowed}} = PoolBridge.getattr(pb, "os.environ")
    box = PoolBridge.create!(pb, "pb_test_helpers.Box", [1])
    assert {:error, %Error{code: :not_allowed}} = PoolBridge.get_attr(pb, box, "__class__")
    stop_pool(pb)
  end

  test "a worker crash fails its call; the slot restarts; old refs are session_lost" do
    pb = start_pool()
    box = PoolBridge.create!(pb, "pb_test_helpers.Box", [1], session: "victim")
    old = PoolBridge.call!(pb, "os.getpid", [], session: "victim")
    assert {:error, %Error{code: :worker_crashed}} = PoolBridge.call(pb, "os._exit", [1], session: "victim")
    new = PoolBridge.call!(pb, "os.getpid", [], session: "victim")
    assert new != old
    assert {:error, %Error{code: :session_lost}} = PoolBridge.method(pb, box, "get")
    stop_pool(pb)
  end

  @tag :v2
  test "protocol 2: the hello's epoch is the refs' epoch; worker_crashed says the request ran" do
    pb = start_pool(workers: 1)
    {:ok, info} = PoolBridge.info(pb)
    assert info.protocol >= 2
    assert info.epoch =~ ~r/^[0-9a-f]{16}$/
    assert %PoolBridge.Ref{epoch: epoch} = PoolBridge.create!(pb, "pb_test_helpers.Box", [1])
    assert epoch == info.epoch
    assert {:error, %Error{code: :worker_crashed, ran: true}} = PoolBridge.call(pb, "os._exit", [1])
    stop_pool(pb)
  end
end
