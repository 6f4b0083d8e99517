defmodule PoolBridge.Msgpack do
  @moduledoc """
  A minimal, dependency-free msgpack codec — enough for the poolbridge Port protocol.

  Encoding (Elixir → msgpack):

    * `nil`, `true`, `false` → nil / bool; other atoms → str (their name)
    * integers (−2^63 .. 2^64−1) → the smallest int/uint form; floats → float 64
    * binaries → str when valid UTF-8, otherwise bin; `{:bin, binary}` forces bin
    * lists and tuples → array; maps → map (structs are refused)
    * `{:ext, type, binary}` → ext (the server refuses ext types; useful for tests only)

  Decoding (msgpack → Elixir): nil/bool/ints/floats as expected, str and bin → binary,
  array → list, map → map, ext → `{:ext, type, binary}`, NaN/±Inf floats → `:nan`,
  `:infinity`, `:neg_infinity`.
  """

  @spec encode(term()) :: binary()
  def encode(term), do: IO.iodata_to_binary(enc(term))

  @doc """
  Encode a request map with `"id"` as its first key (whatever the map's own key order), so the
  server can read the id even from a frame it refuses as too large.
  """
  @spec encode_request(term(), map()) :: binary()
  def encode_request(id, msg) when is_map(msg) do
    rest = Map.delete(msg, "id")
    IO.iodata_to_binary([
      map_header(map_size(rest) + 1),
      enc("id"),
      enc(id) | Enum.map(rest, fn {k, v} -> [enc(k), enc(v)] end)
    ])
  end

  @spec decode(binary()) :: {:ok, term()} | {:error, term()}
  def decode(binary) when is_binary(binary) do
    case dec(binary) do
      {value, <<>>} -> {:ok, value}
      {_value, rest} -> {:error, {:trailing_bytes, byte_size(rest)}}
    end
  rescue
    e in [MatchError, FunctionClauseError, CaseClauseError, ArgumentError] -> {:error, {:invalid, e}}
  end

  # -- encoding -------------------------------------------------------------------------------

  defp enc(nil), do: <<0xC0>>
  defp enc(false), do: <<0xC2>>
  defp enc(true), do: <<0xC3>>
  defp enc(a) when is_atom(a), do: enc(Atom.to_string(a))

  defp enc(i) when is_integer(i) and i >= 0 do
    cond do
      i < 0x80 -> <<i>>
      i < 0x100 -> <<0xCC, i>>
      i < 0x10000 -> <<0xCD, i::16>>
      i < 0x100000000 -> <<0xCE, i::32>>
      i < 0x10000000000000000 -> <<0xCF, i::64>>
      true -> raise ArgumentError, "integer too large for msgpack: #{i}"
    end
  end

  defp enc(i) when is_integer(i) do
    cond do
      i >= -32 -> <<i::signed-8>>
      i >= -0x80 -> <<0xD0, i::signed-8>>
      i >= -0x8000 -> <<0xD1, i::signed-16>>
      i >= -0x80000000 -> <<0xD2, i::signed-32>>
      i >= -0x8000000000000000 -> <<0xD3, i::signed-64>>
      true -> raise ArgumentError, "integer too small for msgpack: #{i}"
    end
  end

  defp enc(f) when is_float(f), do: <<0xCB, f::float-64>>
  defp enc({:bin, b}) when is_binary(b), do: [bin_header(byte_size(b)), b]

  defp enc({:ext, type, data}) when is_integer(type) and is_binary(data) do
    header =
      case byte_size(data) do
        1 -> <<0xD4>>
        2 -> <<0xD5>>
        4 -> <<0xD6>>
        8 -> <<0xD7>>
        16 -> <<0xD8>>
        n when n < 0x100 -> <<0xC7, n>>
        n when n < 0x10000 -> <<0xC8, n::16>>
        n -> <<0xC9, n::32>>
      end

    [header, <<type::signed-8>>, data]
  end

  defp enc(b) when is_binary(b) do
    if String.valid?(b), do: [str_header(byte_size(b)), b], else: [bin_header(byte_size(b)), b]
  end

  defp enc(l) when is_list(l), do: [array_header(length(l)) | Enum.map(l, &enc/1)]
  defp enc(t) when is_tuple(t), do: enc(Tuple.to_list(t))
  defp enc(%_{} = s), do: raise(ArgumentError, "cannot encode a struct: #{inspect(s)}")

  defp enc(m) when is_map(m) do
    [map_header(map_size(m)) | Enum.map(m, fn {k, v} -> [enc(k), enc(v)] end)]
  end

  defp enc(other), do: raise(ArgumentError, "cannot encode #{inspect(other)} as msgpack")

  defp str_header(n) when n < 32, do: <<0xA0 + n>>
  defp str_header(n) when n < 0x100, do: <<0xD9, n>>
  defp str_header(n) when n < 0x10000, do: <<0xDA, n::16>>
  defp str_header(n), do: <<0xDB, n::32>>

  defp bin_header(n) when n < 0x100, do: <<0xC4, n>>
  defp bin_header(n) when n < 0x10000, do: <<0xC5, n::16>>
  defp bin_header(n), do: <<0xC6, n::32>>

  defp array_header(n) when n < 16, do: <<0x90 + n>>
  defp array_header(n) when n < 0x10000, do: <<0xDC, n::16>>
  defp array_header(n), do: <<0xDD, n::32>>

  defp map_header(n) when n < 16, do: <<0x80 + n>>
  defp map_header(n) when n < 0x10000, do: <<0xDE, n::16>>
  defp map_header(n), do: <<0xDF, n::32>>

  # -- decoding -------------------------------------------------------------------------------

  defp dec(<<b, r::binary>>) when b < 0x80, do: {b, r}
  defp dec(<<b, r::binary>>) when b >= 0xE0, do: {b - 0x100, r}
  defp dec(<<b, r::binary>>) when b in 0x80..0x8F, do: dec_map(r, b - 0x80, [])
  defp dec(<<b, r::binary>>) when b in 0x90..0x9F, do: dec_list(r, b - 0x90, [])
  defp dec(<<b, r::binary>>) when b in 0xA0..0xBF, do: take(r, b - 0xA0)
  defp dec(<<0xC0, r::binary>>), do: {nil, r}
  defp dec(<<0xC2, r::binary>>), do: {false, r}
  defp dec(<<0xC3, r::binary>>), do: {true, r}
  defp dec(<<0xC4, n, r::binary>>), do: take(r, n)
  defp dec(<<0xC5, n::16, r::binary>>), do: take(r, n)
  defp dec(<<0xC6, n::32, r::binary>>), do: take(r, n)
  defp dec(<<0xC7, n, t::signed-8, r::binary>>), do: ext(t, r, n)
  defp dec(<<0xC8, n::16, t::signed-8, r::binary>>), do: ext(t, r, n)
  defp dec(<<0xC9, n::32, t::signed-8, r::binary>>), do: ext(t, r, n)
  defp dec(<<0xCA, bits::binary-size(4), r::binary>>), do: {float(bits, 32), r}
  defp dec(<<0xCB, bits::binary-size(8), r::binary>>), do: {float(bits, 64), r}
  defp dec(<<0xCC, i, r::binary>>), do: {i, r}
  defp dec(<<0xCD, i::16, r::binary>>), do: {i, r}
  defp dec(<<0xCE, i::32, r::binary>>), do: {i, r}
  defp dec(<<0xCF, i::64, r::binary>>), do: {i, r}
  defp dec(<<0xD0, i::signed-8, r::binary>>), do: {i, r}
  defp dec(<<0xD1, i::signed-16, r::binary>>), do: {i, r}
  defp dec(<<0xD2, i::signed-32, r::binary>>), do: {i, r}
  defp dec(<<0xD3, i::signed-64, r::binary>>), do: {i, r}
  defp dec(<<0xD4, t::signed-8, r::binary>>), do: ext(t, r, 1)
  defp dec(<<0xD5, t::signed-8, r::binary>>), do: ext(t, r, 2)
  defp dec(<<0xD6, t::signed-8, r::binary>>), do: ext(t, r, 4)
  defp dec(<<0xD7, t::signed-8, r::binary>>), do: ext(t, r, 8)
  defp dec(<<0xD8, t::signed-8, r::binary>>), do: ext(t, r, 16)
  defp dec(<<0xD9, n, r::binary>>), do: take(r, n)
  defp dec(<<0xDA, n::16, r::binary>>), do: take(r, n)
  defp dec(<<0xDB, n::32, r::binary>>), do: take(r, n)
  defp dec(<<0xDC, n::16, r::binary>>), do: dec_list(r, n, [])
  defp dec(<<0xDD, n::32, r::binary>>), do: dec_list(r, n, [])
  defp dec(<<0xDE, n::16, r::binary>>), do: dec_map(r, n, [])
  defp dec(<<0xDF, n::32, r::binary>>), do: dec_map(r, n, [])

  defp take(r, n) do
    <<s::binary-size(n), rest::binary>> = r
    {s, rest}
  end

  defp ext(type, r, n) do
    {data, rest} = take(r, n)
    {{:ext, type, data}, rest}
  end

  defp float(<<f::float-32>>, 32), do: f
  defp float(<<f::float-64>>, 64), do: f
  defp float(<<0::1, _::bitstring>> = bits, size), do: special(bits, size, :infinity)
  defp float(bits, size), do: special(bits, size, :neg_infinity)

  defp special(bits, size, inf) do
    mantissa_bits = if size == 32, do: 23, else: 52
    <<_::1, _exp::size(size - 1 - mantissa_bits), mantissa::size(mantissa_bits)>> = bits
    if mantissa == 0, do: inf, else: :nan
  end

  defp dec_list(r, 0, acc), do: {Enum.reverse(acc), r}

  defp dec_list(r, n, acc) do
    {v, r} = dec(r)
    dec_list(r, n - 1, [v | acc])
  end

  defp dec_map(r, 0, acc), do: {Map.new(acc), r}

  defp dec_map(r, n, acc) do
    {k, r} = dec(r)
    {v, r} = dec(r)
    dec_map(r, n - 1, [{k, v} | acc])
  end
end
