defmodule PoolBridge.CallsTest do
  @moduledoc "Timeouts, the pending bound, large calls, exact types, errors, telemetry, load."
  use ExUnit.Case, async: false
  import PoolBridge.TestSupport
  alias PoolBridge.{Bytes, Error, Ref}

  @pool :calls_test_pool

  setup_all do
    start_shared(name: @pool, workers: 2, max_pending: 5_000)
    on_exit(fn -> stop_pool(@pool) end)
    :ok
  end

  test "a timeout drops the pending entry and returns :timeout; the pool keeps serving" do
    assert {:error, %Error{code: :timeout}} =
             PoolBridge.call(@pool, "time.sleep", [1.5], session: "t1", timeout: 50)

    assert {:ok, %{pending: 0}} = PoolBridge.info(@pool)
    # the late reply of the sleep is dropped, never delivered to a later call of this process
    assert {:ok, 7} = PoolBridge.call(@pool, "operator.add", [3, 4], session: "t1", timeout: 10_000)
    refute_received _
  end

  @tag :v2
  test "a timed-out request that had not started is cancelled in Python: it never runs" do
    key = "never-#{System.unique_integer([:positive])}"

    blocker =
      Task.async(fn -> PoolBridge.call(@pool, "time.sleep", [1.0], session: "t2", timeout: 10_000) end)

    assert eventually(fn -> match?({:ok, %{pending: 1}}, PoolBridge.info(@pool)) end)
    # queued behind the sleep in the same worker: not started when it times out
    assert {:error, %Error{code: :timeout}} =
             PoolBridge.helper(@pool, "remember", [key, 1], session: "t2", timeout: 100)

    assert {:ok, nil} = Task.await(blocker, 10_000)
    assert {:ok, nil} = PoolBridge.helper(@pool, "recall", [key], session: "t2")
  end

  @tag :v2
  test "on_timeout: :restart: the server times the request out and restarts its worker" do
    pb = start_pool(workers: 1)
    {:ok, %{"pid" => before}} = PoolBridge.ping(pb, session: "r")

    # the worker is up and idle (it answered), so the sleep starts long before its timeout; a
    # request that has not started at its timeout is dropped instead, with no restart
    assert {:ok, ^before} = PoolBridge.call(pb, "os.getpid", [], session: "r")
    # the server's answer (not the client's own timer): it timed the request out itself
    assert {:error, %Error{code: :timeout, type: "CallTimeoutError"}} =
             PoolBridge.call(pb, "time.sleep", [30], session: "r", timeout: 1_000, on_timeout: :restart)

    assert eventually(
             fn ->
               match?(
                 {:ok, %{"pid" => pid, "generation" => 1}} when pid != before,
                 PoolBridge.ping(pb, session: "r")
               )
             end,
             20_000
           )

    assert {:ok, 3} = PoolBridge.call(pb, "operator.add", [1, 2], session: "r")
    stop_pool(pb)
  end

  @tag :v2
  test "ping and stats are answered while the session's worker is busy (protocol 2)" do
    busy = Task.async(fn -> PoolBridge.call(@pool, "time.sleep", [2], session: "pinged", timeout: 10_000) end)
    assert eventually(fn -> match?({:ok, %{pending: 1}}, PoolBridge.info(@pool)) end)
    slot = PoolBridge.slot_for(@pool, "pinged")

    assert {:ok, %{"slot" => ^slot, "generation" => _, "pid" => _}} =
             PoolBridge.ping(@pool, session: "pinged")

    assert {:ok, %{"workers" => 2, "slots" => [%{"slot" => 0}, %{"slot" => 1}] = slots}} =
             PoolBridge.stats(@pool)

    assert Enum.all?(slots, &Map.has_key?(&1, "last_reply_ms"))
    assert Task.yield(busy, 0) == nil
    assert {:ok, nil} = Task.await(busy, 10_000)
  end

  test "when_busy: :error says :busy at the bound; :wait blocks until a slot frees" do
    pb = start_pool(max_pending: 2)

    sleepers =
      for s <- ~w(b1 b2), do: Task.async(fn -> PoolBridge.call(pb, "time.sleep", [0.5], session: s) end)

    assert eventually(fn -> match?({:ok, %{pending: 2}}, PoolBridge.info(pb)) end)
    assert {:error, %Error{code: :busy}} = PoolBridge.call(pb, "os.getpid", [], when_busy: :error)
    assert {:ok, 3} = PoolBridge.call(pb, "operator.add", [1, 2], when_busy: :wait, timeout: 10_000)
    for t <- sleepers, do: assert({:ok, nil} = Task.await(t, 10_000))
    stop_pool(pb)
  end

  test "a large call does not stall a ping: callers encode and write their own frames" do
    big = Enum.to_list(1..1_500_000)

    caller =
      Task.async(fn -> PoolBridge.call(@pool, "builtins.len", [big], session: "big", timeout: 120_000) end)

    # catch the big caller while it encodes, and freeze it there
    assert eventually(fn ->
             match?(
               {:current_function, {PoolBridge.Codec, _, _}},
               Process.info(caller.pid, :current_function)
             )
           end)

    :erlang.suspend_process(caller.pid)

    try do
      for i <- 1..20 do
        assert {:ok, %{"pid" => _}} = PoolBridge.ping(@pool, session: "small-#{i}", timeout: 10_000)
        assert {:ok, ^i} = PoolBridge.call(@pool, "operator.pos", [i], session: "big", timeout: 10_000)
      end
    after
      :erlang.resume_process(caller.pid)
    end

    assert {:ok, 1_500_000} = Task.await(caller, 120_000)
  end

  test "exact types: bytes stay bytes, NaN/±Inf, tuples, map keys, refs for the rest" do
    assert {:ok, ["bytes", "str", "bytes", "float", "float", "list", "dict", "NoneType"]} =
             PoolBridge.call(@pool, "pb_test_helpers.kinds", [
               PoolBridge.bytes(<<1, 2, 3>>),
               "abc",
               <<255>>,
               :nan,
               :neg_infinity,
               {1, 2},
               %{1 => 2},
               nil
             ])

    {:ok, digest} = PoolBridge.call(@pool, "hashlib.sha256", [PoolBridge.bytes(<<1, 2, 3>>)], ret: :ref)

    assert PoolBridge.method!(@pool, digest, "hexdigest") ==
             Base.encode16(:crypto.hash(:sha256, <<1, 2, 3>>), case: :lower)

    assert {:ok, %Bytes{data: "abc"}} = PoolBridge.call(@pool, "builtins.bytes", [[97, 98, 99]])
    assert {:ok, true} = PoolBridge.call(@pool, "math.isnan", [:nan])
    assert {:ok, :infinity} = PoolBridge.call(@pool, "builtins.float", ["inf"])
    assert {:ok, :nan} = PoolBridge.call(@pool, "builtins.float", ["nan"])
    assert {:ok, [1, "a"]} = PoolBridge.call(@pool, "builtins.tuple", [[1, "a"]])

    assert {:ok, %{1 => "x", nil => true}} =
             PoolBridge.call(@pool, "builtins.dict", [[[1, "x"], [nil, true]]])

    assert {:ok, %Ref{}} = PoolBridge.call(@pool, "builtins.frozenset", [[1, 2]])
  end

  @tag :v2
  test "big integers cross both ways" do
    for n <- [2 ** 64, -(2 ** 63) - 1, 3 ** 100] do
      assert {:ok, ^n} = PoolBridge.call(@pool, "operator.pos", [n])
    end

    assert PoolBridge.call(@pool, "builtins.pow", [2, 100]) == {:ok, 2 ** 100}
  end

  test "errors: every code an atom, with type, message, traceback; bang variants raise" do
    assert {:error,
            %Error{code: :remote_error, type: "ValueError", message: "math domain error", traceback: tb}} =
             PoolBridge.call(@pool, "math.sqrt", [-1.0])

    assert tb =~ "ValueError: math domain error"
    # a failure in Python code: the traceback starts at the user's frames
    assert {:error, %Error{code: :remote_error, type: "json.decoder.JSONDecodeError", traceback: tb}} =
             PoolBridge.call(@pool, "json.loads", ["{"])

    assert tb =~ "Traceback (most recent call last)"
    assert {:error, %Error{code: :helper_not_found}} = PoolBridge.helper(@pool, "no_such_helper")
    assert {:error, %Error{code: :bad_request}} = PoolBridge.call(@pool, "os.getpid", [self()])

    assert_raise Error, ~r/remote_error: ValueError: math domain error/, fn ->
      PoolBridge.call!(@pool, "math.sqrt", [-1.0])
    end

    assert Error.from_wire(%{"code" => "brand_new_code", "message" => "m"}).code == "brand_new_code"
    assert Error.from_wire(%{"code" => "cancelled"}).code == :cancelled
  end

  test "streams: lazy, in batches; closed in Python on early halt and when the consumer dies" do
    s = "streams"

    assert Enum.to_list(0..999) ==
             PoolBridge.stream(@pool, "builtins.range", [1000], batch: 64, session: s) |> Enum.to_list()

    assert [] == PoolBridge.stream(@pool, "builtins.range", [0], session: s) |> Enum.to_list()

    assert [3, 2, 1] ==
             PoolBridge.stream(@pool, "pb_test_helpers.countdown", [3], session: s) |> Enum.to_list()

    assert [0, 1, 2] == PoolBridge.stream(@pool, "itertools.count", [], batch: 2, session: s) |> Enum.take(3)

    key = "halt-#{System.unique_integer([:positive])}"

    PoolBridge.stream(@pool, "pb_test_helpers.guarded_stream", [1000, key], batch: 4, session: s)
    |> Enum.take(6)

    assert {:ok, true} = PoolBridge.call(@pool, "pb_test_helpers.was_closed", [key], session: s)

    assert_raise Error, ~r/stream broke/, fn ->
      PoolBridge.stream(@pool, "pb_test_helpers.failing_stream", [5], batch: 2, session: s) |> Enum.to_list()
    end

    key = "dies-#{System.unique_integer([:positive])}"
    parent = self()

    consumer =
      spawn(fn ->
        PoolBridge.stream(@pool, "pb_test_helpers.guarded_stream", [1000, key], batch: 2, session: s)
        |> Stream.each(fn i -> if i == 3, do: send(parent, :midway) && Process.sleep(:infinity) end)
        |> Stream.run()
      end)

    assert_receive :midway, 10_000
    assert {:ok, false} = PoolBridge.call(@pool, "pb_test_helpers.was_closed", [key], session: s)
    Process.exit(consumer, :kill)

    assert eventually(fn ->
             PoolBridge.call(@pool, "pb_test_helpers.was_closed", [key], session: s) == {:ok, true}
           end)
  end

  test "telemetry spans around every operation (when :telemetry is loaded)" do
    Process.register(self(), :pool_bridge_telemetry_sink)

    try do
      {:ok, 3} = PoolBridge.call(@pool, "operator.add", [1, 2], session: "tel")
      {:error, _} = PoolBridge.call(@pool, "math.sqrt", [-1], session: "tel")
      slot = PoolBridge.slot_for(@pool, "tel")

      assert_receive {:telemetry, [:pool_bridge, :call, :start], %{system_time: _},
                      %{op: "call", session: "tel", slot: ^slot}}

      assert_receive {:telemetry, [:pool_bridge, :call, :stop], %{duration: d},
                      %{result: :ok, session: "tel"}}

      assert is_integer(d) and d > 0
      assert_receive {:telemetry, [:pool_bridge, :call, :stop], _, %{result: :error, error: :remote_error}}
    after
      Process.unregister(:pool_bridge_telemetry_sink)
    end
  end

  test "200 processes x 200 calls: every reply reaches its caller with its own value" do
    {:ok, info} = PoolBridge.info(@pool)

    1..200
    |> Task.async_stream(
      fn i ->
        session = PoolBridge.current_session(@pool)
        worker = Enum.at(info.worker_pids, PoolBridge.slot_for(@pool, session))

        for j <- 1..200 do
          {:ok, [^worker, sum]} =
            PoolBridge.call(@pool, "pb_test_helpers.pid_add", [i * 1000, j], timeout: 60_000)

          ^sum = i * 1000 + j
        end

        :done
      end,
      max_concurrency: 200,
      timeout: 120_000
    )
    |> Enum.each(fn result -> assert result == {:ok, :done} end)

    assert {:ok, %{pending: 0}} = PoolBridge.info(@pool)
  end
end
