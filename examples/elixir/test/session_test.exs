defmodule PoolBridge.SessionTest do
  @moduledoc """
  The seed's seven properties, through a real Port and the real server: auto-session isolation,
  the context session over the auto-session, the per-call override reaching the payload, refs
  carrying their session, the same behaviour on every path (one table over all paths and every way
  of setting the session), cross-session refs refused before dispatch, and no leakage.
  """
  use ExUnit.Case, async: false
  import PoolBridge.TestSupport
  alias PoolBridge.{Error, Ref}

  @pool :session_test_pool

  setup_all do
    start_shared(name: @pool, workers: 3)
    {:ok, info} = PoolBridge.info(@pool)
    on_exit(fn -> stop_pool(@pool) end)
    %{info: info}
  end

  defp worker_of(info, session), do: Enum.at(info.worker_pids, PoolBridge.slot_for(@pool, session))

  # -- every path x every way of setting the session ---------------------------------------------

  # Each way runs `op` and says which session must have reached the worker.
  defp ways do
    [
      auto: fn op -> {op.([]), PoolBridge.current_session(@pool)} end,
      with_session: fn op -> PoolBridge.with_session(@pool, "ctx-1", fn -> {op.([]), "ctx-1"} end) end,
      nested_with_session: fn op ->
        PoolBridge.with_session(@pool, "ctx-outer", fn ->
          PoolBridge.with_session(@pool, "ctx-inner", fn -> {op.([]), "ctx-inner"} end)
        end)
      end,
      session_option: fn op -> {op.(session: "opt-1"), "opt-1"} end,
      option_over_context: fn op ->
        PoolBridge.with_session(@pool, "ctx-2", fn -> {op.(session: "opt-2"), "opt-2"} end)
      end
    ]
  end

  # Paths that take no ref: each returns what the worker saw (%{"session", "pid", "slot"}).
  defp session_paths do
    [
      call: fn o -> PoolBridge.call!(@pool, "pb_test_helpers.who", [], o) end,
      helper: fn o -> PoolBridge.helper!(@pool, "whoami", [], o) end,
      create: fn o ->
        PoolBridge.get_attr!(@pool, PoolBridge.create!(@pool, "pb_test_helpers.Probe", [], o), "created")
      end,
      getattr: fn o ->
        %Ref{} = ref = PoolBridge.getattr!(@pool, "pb_test_helpers.Probe", [{:ret, :ref} | o])
        # the ref was stored under the payload's session, in that session's worker
        %{"session" => ref.session, "slot" => ref.slot, "pid" => nil}
      end,
      stream_open_and_next: fn o ->
        [a, b, c] =
          @pool |> PoolBridge.stream("pb_test_helpers.who_stream", [3], [{:batch, 1} | o]) |> Enum.to_list()

        assert a == b and b == c
        a
      end,
      stream_close: fn o ->
        key = "close-#{System.unique_integer([:positive])}"

        [0, 1] =
          @pool
          |> PoolBridge.stream("pb_test_helpers.guarded_stream", [100, key], [{:batch, 1} | o])
          |> Enum.take(2)

        true = PoolBridge.call!(@pool, "pb_test_helpers.was_closed", [key], o)
        PoolBridge.call!(@pool, "pb_test_helpers.who", [], o)
      end,
      ping: fn o ->
        %{"pid" => pid, "slot" => slot} = PoolBridge.ping!(@pool, o)
        %{"session" => nil, "pid" => pid, "slot" => slot}
      end,
      close_session: fn o ->
        ref = PoolBridge.create!(@pool, "pb_test_helpers.Probe", [], o)
        assert PoolBridge.close_session!(@pool, nil, o) >= 1
        assert {:error, %Error{code: :ref_not_found}} = PoolBridge.get_attr(@pool, ref, "created")
        %{"session" => ref.session, "slot" => ref.slot, "pid" => nil}
      end
    ]
  end

  test "every path x every way of setting the session: the resolved session reaches the worker", %{info: info} do
    for {way, run} <- ways(), {path, op} <- session_paths() do
      {seen, expected} = run.(op)
      where = "path #{path}, way #{way}"
      if seen["session"], do: assert(seen["session"] == expected, where)
      assert seen["slot"] == PoolBridge.slot_for(@pool, expected), where
      if seen["pid"], do: assert(seen["pid"] == worker_of(info, expected), where)
    end
  end

  # Paths that act on a ref: the ref's own session wins over the context and the auto-session; a
  # disagreeing session: option is a mismatch.
  defp ref_paths do
    [
      method: fn ref, o -> PoolBridge.method(@pool, ref, "who", [], o) end,
      get_attr: fn ref, o -> PoolBridge.get_attr(@pool, ref, "seen", o) end,
      set_attr: fn ref, o ->
        with {:ok, nil} <- PoolBridge.set_attr(@pool, ref, "poke", 1, o),
             do: PoolBridge.get_attr(@pool, ref, "poke")
      end,
      call_ref: fn ref, o -> PoolBridge.call(@pool, ref, [], o) end,
      release: fn ref, o ->
        with {:ok, nil} <- PoolBridge.release(@pool, ref, o) do
          {:error, %Error{code: :ref_not_found}} =
            PoolBridge.get_attr(@pool, ref, "seen", session: ref.session)

          {:ok, %{"session" => ref.session, "slot" => ref.slot, "pid" => nil}}
        end
      end
    ]
  end

  test "every ref path x every way: the ref's own session wins; a disagreeing session: is refused", %{
    info: info
  } do
    for {way, run} <- ways(), {path, op} <- ref_paths() do
      own = "own-#{path}-#{way}"
      probe = PoolBridge.create!(@pool, "pb_test_helpers.Probe", [], session: own)
      # call_ref needs a callable ref: the Probe's bound method `who`
      ref = if path == :call_ref, do: PoolBridge.get_attr!(@pool, probe, "who", ret: :ref), else: probe
      assert ref.session == own
      {result, asked} = run.(fn o -> op.(ref, o) end)
      where = "path #{path}, way #{way}"

      if Keyword.has_key?([session_option: 1, option_over_context: 1], way) do
        assert {:error, %Error{code: :session_mismatch, message: msg}} = result, where
        assert msg =~ asked, where
      else
        assert {:ok, seen} = result, where
        assert seen["session"] == own, where
        assert seen["slot"] == PoolBridge.slot_for(@pool, own), where
        if seen["pid"], do: assert(seen["pid"] == worker_of(info, own), where)
      end
    end
  end

  # -- the properties one by one -----------------------------------------------------------------

  test "auto-sessions: one per process, isolated, many processes at once", %{info: info} do
    results =
      1..60
      |> Task.async_stream(
        fn i ->
          mine = PoolBridge.current_session(@pool)
          ^mine = PoolBridge.current_session(@pool)
          {:ok, 1} = PoolBridge.helper(@pool, "remember", ["k", i])
          {:ok, ^i} = PoolBridge.helper(@pool, "recall", ["k"])
          {:ok, %{"session" => ^mine, "pid" => pid}} = PoolBridge.call(@pool, "pb_test_helpers.who")
          {mine, pid}
        end,
        max_concurrency: 60,
        timeout: 30_000
      )
      |> Enum.map(fn {:ok, r} -> r end)

    sessions = Enum.map(results, &elem(&1, 0))
    assert length(Enum.uniq(sessions)) == 60
    assert PoolBridge.current_session(@pool) not in sessions
    for {s, pid} <- results, do: assert(pid == worker_of(info, s))
  end

  test "with_session overrides the auto-session, nests, and is restored on return and on raise" do
    auto = PoolBridge.current_session(@pool)
    assert String.starts_with?(auto, "auto-")

    PoolBridge.with_session(@pool, "a", fn ->
      assert PoolBridge.current_session(@pool) == "a"

      assert_raise RuntimeError, fn ->
        PoolBridge.with_session(@pool, "b", fn ->
          assert PoolBridge.current_session(@pool) == "b"
          raise "boom"
        end)
      end

      assert PoolBridge.current_session(@pool) == "a"
      catch_throw(PoolBridge.with_session(@pool, "c", fn -> throw(:out) end))
      assert PoolBridge.current_session(@pool) == "a"
    end)

    assert PoolBridge.current_session(@pool) == auto
    assert_raise ArgumentError, fn -> PoolBridge.with_session(@pool, "", fn -> :ok end) end
    assert_raise ArgumentError, fn -> PoolBridge.call(@pool, "os.getpid", [], session: 7) end
  end

  test "refs carry their session, slot, generation and the server's epoch", %{info: info} do
    ref = PoolBridge.create!(@pool, "pb_test_helpers.Box", [1], session: "carry")
    assert %Ref{session: "carry", generation: 0, epoch: epoch} = ref
    assert epoch == info.epoch
    assert ref.slot == PoolBridge.slot_for(@pool, "carry")
    # a value msgpack cannot carry comes back as a ref of the session it was made in, nested too
    assert {:ok, [%Ref{session: "carry"}, 1]} =
             PoolBridge.call(@pool, "builtins.list", [[ref, 1]], session: "carry")
  end

  test "cross-session refs are refused before dispatch: the answer comes while that session's worker is busy" do
    ref_a = PoolBridge.create!(@pool, "pb_test_helpers.Box", [1], session: "owner-a")
    busy = Task.async(fn -> PoolBridge.call(@pool, "time.sleep", [3], session: "busy-b", timeout: 30_000) end)
    # the sleep is written (pending in the client) and the server has it once a later request of
    # the same worker queue is answered... we only need it pending: a dispatched request of busy-b
    # would now wait behind it.
    assert eventually(fn -> match?({:ok, %{pending: 1}}, PoolBridge.info(@pool)) end)

    attempts = [
      fn -> PoolBridge.call(@pool, "builtins.id", [ref_a], session: "busy-b", timeout: :infinity) end,
      fn -> PoolBridge.call(@pool, "builtins.len", [[%{"deep" => {1, [ref_a]}}]], session: "busy-b") end,
      fn -> PoolBridge.helper(@pool, "remember", ["k", %{ref_a => 1}], session: "busy-b") end,
      fn -> PoolBridge.call(@pool, "builtins.dict", [], session: "busy-b", kwargs: [x: [ref_a]]) end,
      fn ->
        PoolBridge.with_session(@pool, "busy-b", fn ->
          PoolBridge.create(@pool, "builtins.list", [[ref_a]])
        end)
      end,
      fn -> PoolBridge.method(@pool, ref_a, "get", [], session: "busy-b") end,
      fn -> PoolBridge.set_attr(@pool, ref_a, "value", 2, session: "busy-b") end,
      fn -> PoolBridge.release(@pool, ref_a, session: "busy-b") end,
      fn -> PoolBridge.stream(@pool, "builtins.iter", [[ref_a]], session: "busy-b") |> Enum.to_list() end
    ]

    for attempt <- attempts do
      result =
        try do
          attempt.()
        rescue
          e in Error -> {:error, e}
        end

      assert {:error, %Error{code: :session_mismatch}} = result
      # nothing was written: the only request in flight is still the sleep
      assert {:ok, %{pending: 1}} = PoolBridge.info(@pool)
      assert Task.yield(busy, 0) == nil
    end

    assert {:ok, nil} = Task.await(busy, 30_000)
    assert {:ok, 1} = PoolBridge.method(@pool, ref_a, "get")
  end

  test "no leakage: another session's ref ids are unusable, even guessed" do
    secret = PoolBridge.create!(@pool, "pb_test_helpers.Box", ["secret"], session: "victim")
    slot = PoolBridge.slot_for(@pool, "thief")

    for id <- (secret.id - 5)..(secret.id + 5) do
      forged = %Ref{secret | session: "thief", id: id, slot: slot}
      assert {:error, %Error{code: code}} = PoolBridge.method(@pool, forged, "get")
      assert code == :ref_not_found

      assert {:error, %Error{code: :ref_not_found}} =
               PoolBridge.call(@pool, "builtins.id", [forged], session: "thief")
    end

    # auto-session ids are random, so a process cannot guess another's
    other = Task.async(fn -> PoolBridge.current_session(@pool) end) |> Task.await()
    assert other != PoolBridge.current_session(@pool)
    assert byte_size(other) > 20
  end

  test "a process's auto-session is closed in Python when it exits" do
    parent = self()

    pid =
      spawn(fn ->
        ref = PoolBridge.create!(@pool, "pb_test_helpers.Box", [1])
        {:ok, 1} = PoolBridge.helper(@pool, "remember", ["k", "v"])
        send(parent, {:made, ref})
        receive do: (:exit -> :ok)
      end)

    assert_receive {:made, ref}, 10_000
    assert String.starts_with?(ref.session, "auto-")
    assert {:ok, 1} = PoolBridge.method(@pool, ref, "get")
    send(pid, :exit)
    started = System.monotonic_time(:millisecond)

    assert eventually(fn ->
             match?({:error, %Error{code: :ref_not_found}}, PoolBridge.method(@pool, ref, "get"))
           end)

    elapsed = System.monotonic_time(:millisecond) - started
    assert {:ok, nil} = PoolBridge.helper(@pool, "recall", ["k"], session: ref.session)
    IO.puts("auto-session closed #{elapsed} ms after its process exited")

    # a session given by the app is not closed by the pool
    spawn(fn -> PoolBridge.create!(@pool, "pb_test_helpers.Box", [2], session: "app-owned") end)
    assert eventually(fn -> match?({:ok, 1}, PoolBridge.close_session(@pool, "app-owned")) end)
  end

  test "slot_for, computed in Elixir, agrees with the worker pid for 200 session ids", %{info: info} do
    for i <- 1..200 do
      s = "slot-#{i}"
      slot = PoolBridge.slot_for(@pool, s)
      assert {:ok, %{"slot" => ^slot, "pid" => pid}} = PoolBridge.ping(@pool, session: s)
      assert pid == Enum.at(info.worker_pids, slot)
    end

    assert PoolBridge.slot_for(@pool) == PoolBridge.slot_for(@pool, PoolBridge.current_session(@pool))
  end
end
