defmodule PoolBridge.MsgpackTest do
  use ExUnit.Case, async: true
  alias PoolBridge.Msgpack

  defp rt(v), do: Msgpack.decode(Msgpack.encode(v))

  test "scalars round-trip at every width" do
    for v <- [nil, true, false, 0, 1, 127, 128, 255, 256, 65535, 65536, 4_294_967_295, 4_294_967_296,
              18_446_744_073_709_551_615, -1, -32, -33, -128, -129, -32768, -32769, -2_147_483_648,
              -2_147_483_649, -9_223_372_036_854_775_808, 0.0, 1.5, -2.25e300] do
      assert rt(v) == {:ok, v}
    end
  end

  test "strings, binaries, lists, maps" do
    for v <- ["", "héllo", String.duplicate("a", 31), String.duplicate("b", 32), String.duplicate("c", 300),
              String.duplicate("d", 70_000), Enum.to_list(1..20), Enum.to_list(1..70_000),
              %{"a" => [1, %{"b" => nil}]}, Map.new(1..20, &{&1, &1}), Map.new(1..70_000, &{&1, &1})] do
      assert rt(v) == {:ok, v}
    end

    assert rt(<<255, 0>>) == {:ok, <<255, 0>>}
    assert Msgpack.encode({:bin, "abc"}) == <<0xC4, 3, "abc">>
    assert rt({1, :two}) == {:ok, [1, "two"]}
    assert rt({:ext, 5, "abcd"}) == {:ok, {:ext, 5, "abcd"}}
  end

  test "agrees with Python's msgpack on known bytes" do
    assert Msgpack.encode(%{"id" => 1}) == <<0x81, 0xA2, "id", 0x01>>
    assert Msgpack.encode([1.0]) == <<0x91, 0xCB, 1.0::float-64>>
    assert Msgpack.decode(<<0xCA, 1.5::float-32>>) == {:ok, 1.5}
    assert Msgpack.decode(<<0xCB, 0x7FF0000000000000::64>>) == {:ok, :infinity}
    assert Msgpack.decode(<<0xCB, 0x7FF8000000000000::64>>) == {:ok, :nan}
  end

  test "bad input is an error, not a crash" do
    assert {:error, _} = Msgpack.decode(<<0x92, 1>>)
    assert {:error, _} = Msgpack.decode(<<0xC1>>)
    assert {:error, {:trailing_bytes, 1}} = Msgpack.decode(<<1, 2>>)
    assert_raise ArgumentError, fn -> Msgpack.encode(self()) end
  end
end
