defmodule PoolBridge.PortTest do
  @moduledoc "Every op through a real Port against the real server (fds mode, shared server)."
  use ExUnit.Case, async: false
  import PoolBridge.TestSupport

  @ref "__poolbridge_ref__"

  setup_all do
    pb = start()
    hello = PoolBridge.hello(pb)
    on_exit(fn ->
      PoolBridge.close(pb)
      assert wait_gone([hello["pid"] | hello["worker_pids"]]) == []
    end)
    %{pb: pb, hello: hello}
  end

  test "hello frame", %{hello: hello} do
    assert hello["hello"] == "poolbridge"
    assert hello["protocol"] == 1
    assert hello["slots"] == 2
    assert length(hello["worker_pids"]) == 2
  end

  test "call, getattr, ping, stats, slot_for", %{pb: pb, hello: hello} do
    assert {:ok, 5} = PoolBridge.call(pb, "s", "operator.add", [2, 3])
    assert {:ok, [3, 2, 1]} = PoolBridge.call(pb, "s", "builtins.sorted", [[1, 3, 2]], %{"reverse" => true})
    assert {:ok, pi} = PoolBridge.getattr(pb, "s", "math.pi")
    assert_in_delta pi, 3.14159, 0.001
    assert {:ok, %{"pid" => server_pid}} = PoolBridge.ping(pb)
    assert server_pid == hello["pid"]
    {:ok, slot} = PoolBridge.slot_for(pb, "s")
    assert {:ok, %{"slot" => ^slot, "pid" => worker, "generation" => 0}} = PoolBridge.ping(pb, "s")
    assert worker == Enum.at(hello["worker_pids"], slot)
    assert {:ok, %{"workers" => 2, "slots" => [%{"slot" => 0}, %{"slot" => 1}]}} = PoolBridge.stats(pb)
  end

  test "a session is pinned to one worker pid", %{pb: pb, hello: hello} do
    for session <- ~w(alpha beta gamma delta epsilon) do
      {:ok, slot} = PoolBridge.slot_for(pb, session)
      pids = for _ <- 1..5, into: MapSet.new(), do: elem(PoolBridge.call(pb, session, "os.getpid"), 1)
      assert MapSet.to_list(pids) == [Enum.at(hello["worker_pids"], slot)]
    end
  end

  test "refs: create, method, get/set attribute, call, pass back, release", %{pb: pb} do
    {:ok, box} = PoolBridge.create(pb, "refs", "pb_test_helpers.Box", [10])
    assert PoolBridge.ref?(box)
    assert %{@ref => ["refs", _id, _slot, 0]} = box
    assert {:ok, 15} = PoolBridge.method(pb, box, "add", [5])
    assert {:ok, 15} = PoolBridge.get_attr(pb, box, "value")
    assert {:ok, nil} = PoolBridge.set_attr(pb, box, "value", %{"k" => [1, 2]})
    assert {:ok, %{"k" => [1, 2]}} = PoolBridge.method(pb, box, "get")
    assert {:ok, %{"k" => [1, 2]}} = PoolBridge.call(pb, "refs", "builtins.getattr", [box, "value"])
    assert {:ok, true} = PoolBridge.call(pb, "refs", "operator.is_", [box, box])
    # a value msgpack cannot carry comes back as a ref on its own
    {:ok, obj} = PoolBridge.call(pb, "refs", "builtins.object")
    assert PoolBridge.ref?(obj)
    # a callable ref
    {:ok, cls} = PoolBridge.getattr(pb, "refs", "pb_test_helpers.Box", ret: :ref)
    {:ok, box2} = PoolBridge.call_ref(pb, cls, [3], %{}, ret: :ref)
    assert {:ok, 3} = PoolBridge.method(pb, box2, "get")
    assert {:ok, nil} = PoolBridge.release(pb, box)
    assert {:error, %{code: :ref_not_found}} = PoolBridge.method(pb, box, "get")
    assert {:error, %{code: :ref_not_found}} = PoolBridge.release(pb, box)
  end

  test "a ref of one session is refused in another", %{pb: pb} do
    {:ok, box} = PoolBridge.create(pb, "mine", "pb_test_helpers.Box", [1])
    assert {:error, %{code: :session_mismatch}} = PoolBridge.call(pb, "theirs", "builtins.id", [box])

    assert {:error, %{code: :session_mismatch}} =
             PoolBridge.request(pb, %{"op" => "method", "session" => "theirs", "target" => box, "name" => "get"})
  end

  test "helpers and session state; close_session", %{pb: pb} do
    assert {:ok, 1} = PoolBridge.helper(pb, "h", "remember", ["k", "v"])
    assert {:ok, "v"} = PoolBridge.helper(pb, "h", "recall", ["k"])
    assert {:ok, nil} = PoolBridge.helper(pb, "other", "recall", ["k"])
    {:ok, _} = PoolBridge.create(pb, "h", "pb_test_helpers.Box")
    assert {:ok, 1} = PoolBridge.close_session(pb, "h")
    assert {:ok, nil} = PoolBridge.helper(pb, "h", "recall", ["k"])
  end

  test "streams in batches", %{pb: pb} do
    {:ok, %{"stream" => s, "items" => [5, 4], "done" => false}} =
      PoolBridge.stream_open(pb, "st", "pb_test_helpers.countdown", [5], %{}, batch: 2)
    assert PoolBridge.stream?(s)
    assert {:ok, %{"items" => [3, 2, 1], "done" => true}} = PoolBridge.stream_next(pb, s, batch: 10)
    assert {:error, %{code: :ref_not_found}} = PoolBridge.stream_next(pb, s)
    {:ok, %{"stream" => s2}} = PoolBridge.stream_open(pb, "st", "itertools.count", [], %{}, batch: 3)
    assert {:ok, nil} = PoolBridge.stream_close(pb, s2)
    assert {:error, %{code: :ref_not_found}} = PoolBridge.stream_next(pb, s2)
    assert {:ok, Enum.to_list(0..999)} ==
             PoolBridge.stream_to_list(pb, "st", "builtins.range", [1000], %{}, batch: 64)
  end

  test "errors carry code, type, message and traceback", %{pb: pb} do
    assert {:error, %{code: :remote_error, type: "ValueError", message: "math domain error", traceback: tb}} =
             PoolBridge.call(pb, "e", "math.sqrt", [-1])
    assert tb =~ "Traceback"
    assert {:error, %{code: :bad_request, message: msg}} = PoolBridge.request(pb, %{"op" => "frobnicate"})
    assert msg =~ "unknown op"
    assert {:error, %{code: :bad_request, message: msg}} = PoolBridge.call(pb, nil, "os.getpid")
    assert msg =~ "session"
    assert {:error, %{code: :bad_request}} = PoolBridge.call(pb, "e", "builtins.id", [{:ext, 1, "pickle"}])
    assert {:error, %{code: :bad_request}} = PoolBridge.request(pb, %{"op" => "call", "session" => "e"})
    assert {:error, %{code: :bad_request}} =
             PoolBridge.request(pb, %{"op" => "method", "target" => "not a ref", "name" => "x"})
    assert {:ok, 42} = PoolBridge.call(pb, "e", "operator.mul", [6, 7])
  end

  test "concurrent requests from many processes", %{pb: pb, hello: hello} do
    results =
      1..40
      |> Task.async_stream(
        fn i ->
          session = "conc-#{rem(i, 8)}"
          {:ok, slot} = PoolBridge.slot_for(pb, session)
          for j <- 1..25 do
            {:ok, [pid, sum]} = PoolBridge.call(pb, session, "pb_test_helpers.pid_add", [i, j])
            assert pid == Enum.at(hello["worker_pids"], slot)
            sum
          end
        end,
        max_concurrency: 40,
        timeout: 60_000
      )
      |> Enum.flat_map(fn {:ok, sums} -> sums end)

    assert length(results) == 1000
    assert Enum.sum(results) == Enum.sum(for i <- 1..40, j <- 1..25, do: i + j)
  end

  test "replies come in completion order", %{pb: pb} do
    %{0 => slow_s, 1 => fast_s} = pair_of_sessions_on_different_slots(pb)
    parent = self()
    slow = Task.async(fn ->
      r = PoolBridge.call(pb, slow_s, "time.sleep", [0.5])
      send(parent, :slow_done)
      r
    end)
    for i <- 1..50, do: assert({:ok, _} = PoolBridge.call(pb, fast_s, "operator.add", [i, 1]))
    refute_received :slow_done
    assert {:ok, nil} = Task.await(slow, 10_000)
  end
end

defmodule PoolBridge.PortLifecycleTest do
  @moduledoc "Servers of their own: stdio mode, limits, allow-list, crashes, closing mid-call."
  use ExUnit.Case, async: true
  import PoolBridge.TestSupport

  defp stop_and_check(pb) do
    hello = PoolBridge.hello(pb)
    PoolBridge.close(pb)
    assert wait_gone([hello["pid"] | hello["worker_pids"]]) == []
  end

  test "stdio mode: prints and fd-1 writes in user code never corrupt a frame" do
    pb = start(mode: :stdio)
    for _ <- 1..3 do
      assert {:ok, "noise"} = PoolBridge.helper(pb, "n", "noisy", ["noise"])
      assert {:ok, 9} = PoolBridge.call(pb, "n", "os.write", [1, {:bin, <<0, 0, 0, 5, "hello">>}])
    end
    assert {:ok, 3} = PoolBridge.call(pb, "n", "operator.add", [1, 2])
    stop_and_check(pb)
  end

  test "the port closed mid-call leaves no process behind" do
    pb = start()
    hello = PoolBridge.hello(pb)
    {:ok, slot} = PoolBridge.slot_for(pb, "sleeper")
    assert {:ok, %{"pid" => worker}} = PoolBridge.ping(pb, "sleeper")
    assert worker == Enum.at(hello["worker_pids"], slot)
    task = Task.async(fn -> PoolBridge.call(pb, "sleeper", "time.sleep", [30]) end)
    # the call went out once it is pending in the client; the server has read it once it answers
    # a later request (it reads frames in order)
    assert Enum.find(1..500, fn _ ->
             map_size(:sys.get_state(pb).pending) > 0 or (receive do after 10 -> false end)
           end)
    assert {:ok, _} = PoolBridge.ping(pb)
    started = System.monotonic_time(:millisecond)
    PoolBridge.close(pb)
    assert {:error, %{code: :closed}} = Task.await(task, 5_000)
    assert wait_gone([hello["pid"] | hello["worker_pids"]], 3_000) == []
    assert System.monotonic_time(:millisecond) - started < 3_000
  end

  test "frame_too_large, then the server keeps serving" do
    pb = start(server_args: ["--max-frame", "1000"], workers: 1)
    assert {:error, %{code: :frame_too_large}} = PoolBridge.call(pb, "big", "builtins.len", [String.duplicate("x", 5000)])
    assert {:ok, 500} = PoolBridge.call(pb, "big", "builtins.len", [String.duplicate("x", 500)])
    stop_and_check(pb)
  end

  test "--allow-module refuses everything else with not_allowed" do
    pb = start(server_args: ["--allow-module", "math", "--allow-module", "pb_test_*"], workers: 1)
    assert {:ok, 2.0} = PoolBridge.call(pb, "a", "math.sqrt", [4])
    {:ok, box} = PoolBridge.create(pb, "a", "pb_test_helpers.Box", [1])
    assert {:ok, 1} = PoolBridge.method(pb, box, "get")
    assert {:error, %{code: :not_allowed}} = PoolBridge.call(pb, "a", "os.system", ["true"])
    assert {:error, %{code: :not_allowed}} = PoolBridge.getattr(pb, "a", "os.environ")
    assert {:error, %{code: :not_allowed}} = PoolBridge.get_attr(pb, box, "__class__")
    assert {:error, %{code: :not_allowed}} = PoolBridge.stream_open(pb, "a", "itertools.count")
    stop_and_check(pb)
  end

  test "a worker crash fails its call; the slot restarts; old refs are session_lost" do
    pb = start()
    {:ok, box} = PoolBridge.create(pb, "victim", "pb_test_helpers.Box", [1])
    {:ok, old} = PoolBridge.call(pb, "victim", "os.getpid")
    assert {:error, %{code: :worker_crashed}} = PoolBridge.call(pb, "victim", "os._exit", [1])
    {:ok, new} = PoolBridge.call(pb, "victim", "os.getpid")
    assert new != old
    assert {:error, %{code: :session_lost}} = PoolBridge.method(pb, box, "get")
    stop_and_check(pb)
  end
end
