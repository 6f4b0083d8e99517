defmodule PoolBridge.CodecTest do
  use ExUnit.Case, async: true
  alias PoolBridge.{Bytes, Codec, Error, Ref}

  defp rt(v), do: Codec.decode(Codec.encode(v))

  test "scalars round-trip at every width" do
    for v <-
          [nil, true, false, 0, 1, 127, 128, 255, 256, 65_535, 65_536, 4_294_967_295, 4_294_967_296] ++
            [18_446_744_073_709_551_615, -1, -32, -33, -128, -129, -32_768, -32_769] ++
            [-2_147_483_648, -2_147_483_649, -9_223_372_036_854_775_808, 0.0, 1.5, -2.25e300] do
      assert rt(v) == {:ok, v}
    end
  end

  test "big integers travel tagged, both ways" do
    for v <- [18_446_744_073_709_551_616, -9_223_372_036_854_775_809, 2 ** 200, -(3 ** 90)] do
      assert Codec.encode(v) =~ "__poolbridge_int__"
      assert rt(v) == {:ok, v}
    end
  end

  test "NaN and infinities are atoms both ways" do
    for v <- [:nan, :infinity, :neg_infinity], do: assert(rt(v) == {:ok, v})
    assert Codec.encode(:infinity) == <<0xCB, 0x7FF0000000000000::64>>
    assert Codec.decode(<<0xCA, 0x7FC00000::32>>) == {:ok, :nan}
    assert Codec.decode(<<0xCA, 0xFF800000::32>>) == {:ok, :neg_infinity}
  end

  test "the binary rule: UTF-8 is str, anything else or bytes/1 is bin, bin decodes to Bytes" do
    assert Codec.encode("héllo") == <<0xA6, "héllo">>
    assert Codec.encode(<<1, 2, 3>>) == <<0xA3, 1, 2, 3>>
    assert Codec.encode(PoolBridge.bytes(<<1, 2, 3>>)) == <<0xC4, 3, 1, 2, 3>>
    assert Codec.encode(<<255, 0>>) == <<0xC4, 2, 255, 0>>
    assert rt(PoolBridge.bytes("abc")) == {:ok, %Bytes{data: "abc"}}
    assert rt(<<255, 0>>) == {:ok, %Bytes{data: <<255, 0>>}}
  end

  test "strings, lists, maps (any scalar keys), tuples" do
    for v <-
          ["", String.duplicate("a", 31), String.duplicate("b", 32), String.duplicate("c", 300)] ++
            [String.duplicate("d", 70_000), Enum.to_list(1..20), Enum.to_list(1..70_000)] ++
            [%{"a" => [1, %{"b" => nil}]}, Map.new(1..20, &{&1, &1}), Map.new(1..70_000, &{&1, &1})] ++
            [%{1 => "int", nil => 0, true => 1, 1.5 => 2, %Bytes{data: <<0>>} => 3}] do
      assert rt(v) == {:ok, v}
    end

    assert rt({1, :two, {3}}) == {:ok, [1, "two", [3]]}
  end

  test "agrees with msgpack-python on known bytes" do
    assert Codec.encode(%{"id" => 1}) == <<0x81, 0xA2, "id", 0x01>>
    assert Codec.encode([1.0]) == <<0x91, 0xCB, 1.0::float-64>>
    assert Codec.decode(<<0xCA, 1.5::float-32>>) == {:ok, 1.5}
  end

  test "requests put the id first, and peek_id reads it back without decoding" do
    ctx = %{session: "s", epoch: "e", protocol: 2}
    frame = IO.iodata_to_binary(Codec.encode_request(300, [{"op", "ping"}, {"session", "s"}], ctx))
    assert <<0x83, 0xA2, "id", 0xCD, 300::16, _::binary>> = frame
    assert Codec.decode(frame) == {:ok, %{"id" => 300, "op" => "ping", "session" => "s"}}
    assert Codec.peek_id(frame) == {:ok, 300}
    assert Codec.peek_id(Codec.encode(%{"status" => "ok"})) == :error
  end

  test "ok_value reads an ok reply's value without the reply map; anything else is :error" do
    for id <- [1, 300, 70_000, 5_000_000_000],
        value <- [3, "x", [1, %{"a" => nil}], 1.5, nil, %{"__poolbridge_ref__" => ["s", 1, 0, 0, "e"]}] do
      frame =
        <<0x83, 0xA2, "id">> <>
          Codec.encode(id) <> <<0xA6, "status", 0xA2, "ok", 0xA5, "value">> <> Codec.encode(value)

      {:ok, reply} = Codec.decode(frame, "e")
      assert Codec.ok_value(frame, "e") == {:ok, reply["value"]}
    end

    error = Codec.encode(%{"id" => 1, "status" => "error", "error" => %{"code" => "x"}})
    assert Codec.ok_value(error, nil) == :error

    assert Codec.ok_value(<<0x83, 0xA2, "id", 1, 0xA6, "status", 0xA2, "ok", 0xA5, "value", 0xC1>>, nil) ==
             :error
  end

  test "refs: encoded with their epoch, checked against the request's session and epoch" do
    ref = %Ref{session: "a", id: 7, slot: 1, generation: 0, epoch: "e1"}
    ok = %{session: "a", epoch: "e1", protocol: 2}
    bin = IO.iodata_to_binary(Codec.encode([%{"k" => ref}], ok))
    assert {:ok, [%{"k" => ^ref}]} = Codec.decode(bin)
    assert bin =~ "__poolbridge_ref__"
    # a protocol 1 server gets 4 elements; decoding gives them the client's epoch
    v1 = IO.iodata_to_binary(Codec.encode(ref, %{ok | protocol: 1}))
    assert {:ok, %Ref{epoch: "local"}} = Codec.decode(v1, "local")

    assert_raise Error, ~r/session "a" was passed in session "b"/, fn ->
      Codec.encode([1, {%{"x" => [ref]}}], %{ok | session: "b"})
    end

    assert %Error{code: :session_lost} = catch_error(Codec.encode(ref, %{ok | epoch: "e2"}))
  end

  test "values it cannot carry are a :bad_request error" do
    for v <- [self(), make_ref(), fn -> 1 end, %URI{}, [1 | 2]] do
      assert %Error{code: :bad_request} = catch_error(Codec.encode(v))
    end
  end

  test "bad or partial input is an error, never a crash (fed one byte at a time)" do
    assert {:error, _} = Codec.decode(<<0xC1>>)
    assert {:error, {:trailing_bytes, 1}} = Codec.decode(<<1, 2>>)
    whole = Codec.encode(%{"id" => 1, "value" => [1.5, "x", 2 ** 70, %Bytes{data: "b"}, %{"k" => nil}]})

    for n <- 0..(byte_size(whole) - 1) do
      assert {:error, _} = Codec.decode(binary_part(whole, 0, n))
    end

    assert {:ok, _} = Codec.decode(whole)
  end
end
