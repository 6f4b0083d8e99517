defmodule PoolBridge.ResizeTest do
  @moduledoc "The Port op `resize`: the record, refs that keep working, slot_for following the notice."
  use ExUnit.Case, async: false
  import PoolBridge.TestSupport
  alias PoolBridge.{Error, Hash}

  defp moving(prefix, from, to) do
    Enum.find_value(0..10_000, fn i ->
      s = "#{prefix}-#{i}"
      if Hash.slot_for(s, from) != Hash.slot_for(s, to), do: s
    end)
  end

  test "grow then shrink: moved sessions keep their refs; slot_for follows the new count" do
    pool = start_pool(workers: 2)
    s = moving("grow", 2, 3)
    {:ok, ref} = PoolBridge.create(pool, "collections.Counter", ["abca"], session: s)
    assert PoolBridge.slot_for(pool, s) == Hash.slot_for(s, 2)

    assert {:ok, %{"workers" => 3, "old" => 2, "moved" => moved, "lost" => lost, "refused" => false}} =
             PoolBridge.resize(pool, 3)

    assert s in moved and lost == %{}
    assert PoolBridge.slot_for(pool, s) == Hash.slot_for(s, 3)
    assert {:ok, %{slots: 3}} = PoolBridge.info(pool)
    assert {:ok, 2} = PoolBridge.method(pool, ref, "__getitem__", ["a"])
    assert {:ok, %{"workers" => 3}} = PoolBridge.stats(pool)

    assert {:ok, %{"workers" => 1}} = PoolBridge.resize(pool, 1)
    assert PoolBridge.slot_for(pool, s) == 0
    assert {:ok, 1} = PoolBridge.method(pool, ref, "__getitem__", ["b"])
    stop_pool(pool)
  end

  test "refuse changes nothing; a bad count is refused before anything is sent" do
    pool = start_pool(workers: 2)
    s = moving("refuse", 2, 3)
    {:ok, lock} = PoolBridge.create(pool, "threading.Lock", [], session: s)

    assert {:ok, %{"refused" => true, "workers" => 2, "lost" => %{^s => _}}} =
             PoolBridge.resize(pool, 3, on_unmovable: :refuse)

    assert PoolBridge.slot_for(pool, s) == Hash.slot_for(s, 2)
    assert {:ok, false} = PoolBridge.method(pool, lock, "locked")
    assert {:error, %Error{code: :bad_request}} = PoolBridge.resize(pool, 2, on_unmovable: :maybe)
    assert_raise FunctionClauseError, fn -> PoolBridge.resize(pool, 0) end
    stop_pool(pool)
  end
end
