defmodule PoolBridge.HashTest do
  @moduledoc "docs/hashing.md's vector tables, read from the document itself."
  use ExUnit.Case, async: true
  alias PoolBridge.Hash

  @doc_path Path.expand("../../../docs/hashing.md", __DIR__)

  defp rows(heading_prefix) do
    @doc_path
    |> File.read!()
    |> String.split("\n")
    |> Enum.drop_while(&(not String.starts_with?(&1, heading_prefix)))
    |> Enum.drop(2)
    |> Enum.take_while(&String.starts_with?(&1, "|"))
    |> Enum.map(fn line -> line |> String.split("|") |> Enum.slice(1..-2//1) |> Enum.map(&String.trim/1) end)
  end

  # `"json string"` optionally followed by `* N`
  defp session_id(cell) do
    case Regex.run(~r/^`("(?:[^"\\]|\\.)*")(?:\s*\*\s*(\d+))?`$/, cell) do
      [_, literal] -> decode_json_string(literal)
      [_, literal, times] -> String.duplicate(decode_json_string(literal), String.to_integer(times))
    end
  end

  defp decode_json_string(literal) do
    # \uXXXX escapes, with UTF-16 surrogate pairs
    units =
      Regex.scan(~r/\\u([0-9a-fA-F]{4})|(.)/us, String.slice(literal, 1..-2//1))
      |> Enum.flat_map(fn
        [_, hex] -> [{:u, String.to_integer(hex, 16)}]
        [_, "", char] -> [{:c, char}]
      end)

    join(units, "")
  end

  defp join([], acc), do: acc

  defp join([{:u, hi}, {:u, lo} | rest], acc) when hi in 0xD800..0xDBFF,
    do: join(rest, acc <> <<0x10000 + (hi - 0xD800) * 0x400 + (lo - 0xDC00)::utf8>>)

  defp join([{:u, cp} | rest], acc), do: join(rest, acc <> <<cp::utf8>>)
  defp join([{:c, c} | rest], acc), do: join(rest, acc <> c)

  test "stable_hash64 vectors" do
    rows = rows("| id | shown | UTF-8 bytes")
    assert length(rows) >= 10

    for [id, _shown, nbytes, hex, dec | _] <- rows do
      s = session_id(id)
      assert byte_size(s) == String.to_integer(nbytes)
      assert Hash.stable_hash64(s) == String.to_integer(dec)
      assert Hash.stable_hash64(s) == String.to_integer(String.trim(hex, "`"), 16)
    end
  end

  test "slot vectors" do
    [header | _] = rows("| id | n=1")
    assert header != []
    ns = [1, 2, 3, 4, 8, 16, 100, 1000]

    for [id | slots] <- rows("| id | n=1") do
      s = session_id(id)
      for {n, slot} <- Enum.zip(ns, slots), do: assert(Hash.slot_for(s, n) == String.to_integer(slot))
    end
  end

  test "published jump_hash vectors and the consistency property" do
    for [key, buckets, bucket] <- rows("| key | buckets") do
      key =
        if String.starts_with?(key, "0x"),
          do: String.to_integer(String.slice(key, 2..-1//1), 16),
          else: String.to_integer(key)

      assert Hash.jump_hash(key, String.to_integer(buckets)) == String.to_integer(bucket)
    end

    for k <- 1..300, key = Hash.stable_hash64("k#{k}"), n <- 1..20 do
      assert Hash.jump_hash(key, n + 1) in [Hash.jump_hash(key, n), n]
    end
  end
end
