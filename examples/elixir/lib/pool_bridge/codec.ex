defmodule PoolBridge.Codec do
  @moduledoc """
  The wire codec: msgpack (no dependencies) plus poolbridge's tagged values, protocol version 2.

  Encoding, Elixir → Python:

  | Elixir | msgpack | Python |
  |---|---|---|
  | `nil`, `true`, `false` | nil, bool | `None`, `bool` |
  | integer in −2^63..2^64−1 | int | `int` |
  | other integers | `{"__poolbridge_int__": "<decimal>"}` | `int` |
  | float, `:nan`, `:infinity`, `:neg_infinity` | float 64 | `float` |
  | binary, valid UTF-8 | str | `str` |
  | binary, not UTF-8; `%PoolBridge.Bytes{}` (`PoolBridge.bytes/1`) | bin | `bytes` |
  | other atoms | str (the atom's name) | `str` |
  | list, tuple | array | `list` |
  | map (keys: any of the above scalars) | map | `dict` |
  | `%PoolBridge.Ref{}` | `{"__poolbridge_ref__": [session, id, slot, generation, epoch]}` | the object |

  Other structs, pids, functions, ports and references cannot be encoded (`:bad_request`).

  Decoding, Python → Elixir: the same table read backwards, except that `bytes` come back as
  `%PoolBridge.Bytes{}` (so they round-trip as bytes), tuples arrive as lists, NaN/±Inf as the three
  atoms, and objects msgpack cannot carry (and sets) as `%PoolBridge.Ref{}`.

  A ref written into a request must belong to the request's session and to this server's epoch;
  the encoder checks that while it walks the value (one pass), so a mismatching ref nested anywhere
  in the arguments is refused before a byte is written (`:session_mismatch` / `:session_lost`).
  """

  import Bitwise

  alias PoolBridge.{Bytes, Error, Ref, StreamRef}

  @ref_tag "__poolbridge_ref__"
  @stream_tag "__poolbridge_stream__"
  @int_tag "__poolbridge_int__"

  @typedoc "What the encoder checks refs against: the request's session and the server's epoch."
  @type ctx :: %{session: String.t() | nil, epoch: String.t(), protocol: pos_integer()}

  # -- requests ---------------------------------------------------------------------------------

  @doc """
  Encode one request: `id` first (so even a frame the server refuses as too large is answered with
  its id), then `fields`. Returns iodata (large binaries are not copied). Raises
  `PoolBridge.Error` (`:bad_request`, `:session_mismatch`, `:session_lost`) for a value it refuses.
  """
  @spec encode_request(integer(), [{String.t(), term()}], ctx()) :: iodata()
  def encode_request(id, fields, ctx) when is_list(fields) do
    [map_header(length(fields) + 1), <<0xA2, "id">>, enc(id, ctx) | pairs(fields, ctx)]
  end

  # The field names are the package's own ASCII literals ("op", "session", ...): written as str
  # without the UTF-8 check a value gets.
  defp pairs([], _ctx), do: []
  defp pairs([{k, v} | rest], ctx), do: [str_header(byte_size(k)), k, enc(v, ctx) | pairs(rest, ctx)]

  @doc "Encode any term (with no session to check refs against: refs are refused)."
  @spec encode(term()) :: binary()
  def encode(term), do: IO.iodata_to_binary(enc(term, %{session: nil, epoch: nil, protocol: 2}))

  @doc "Encode a term as iodata under `ctx` (raises `PoolBridge.Error` on a value it refuses)."
  @spec encode(term(), ctx()) :: iodata()
  def encode(term, ctx), do: enc(term, ctx)

  # -- encoding ---------------------------------------------------------------------------------

  defp enc(nil, _), do: <<0xC0>>
  defp enc(false, _), do: <<0xC2>>
  defp enc(true, _), do: <<0xC3>>
  defp enc(i, _) when is_integer(i) and i >= 0 and i < 0x80, do: <<i>>
  defp enc(i, _) when is_integer(i) and i < 0 and i >= -32, do: <<i::signed-8>>
  defp enc(i, _) when is_integer(i), do: int(i)
  defp enc(b, _) when is_binary(b), do: str_or_bin(b)
  defp enc(f, _) when is_float(f), do: <<0xCB, f::float-64>>
  defp enc(l, ctx) when is_list(l), do: [array_header(list_length(l)) | list(l, ctx)]
  defp enc(%Ref{} = ref, ctx), do: ref(ref, ctx)
  defp enc(%Bytes{data: b}, _) when is_binary(b), do: [bin_header(byte_size(b)), b]
  defp enc(%StreamRef{} = s, ctx), do: stream(s, ctx)

  defp enc(%{__struct__: mod} = s, _),
    do: refuse("cannot encode a #{inspect(mod)} struct (#{inspect(s, limit: 5)})")

  defp enc(m, ctx) when is_map(m) do
    [map_header(map_size(m)) | :maps.fold(fn k, v, acc -> [enc(k, ctx), enc(v, ctx) | acc] end, [], m)]
  end

  defp enc(:nan, _), do: <<0xCB, 0x7FF8000000000000::64>>
  defp enc(:infinity, _), do: <<0xCB, 0x7FF0000000000000::64>>
  defp enc(:neg_infinity, _), do: <<0xCB, 0xFFF0000000000000::64>>
  defp enc(a, _) when is_atom(a), do: str_or_bin(Atom.to_string(a))
  defp enc(t, ctx) when is_tuple(t), do: enc(Tuple.to_list(t), ctx)
  defp enc(other, _), do: refuse("cannot encode #{inspect(other, limit: 5)}")

  defp list_length(l) do
    length(l)
  rescue
    ArgumentError -> refuse("cannot encode an improper list: #{inspect(l, limit: 5)}")
  end

  defp list([], _ctx), do: []
  defp list([h | t], ctx), do: [enc(h, ctx) | list(t, ctx)]
  defp list(improper, _ctx), do: refuse("cannot encode an improper list (tail #{inspect(improper)})")

  defp str_or_bin(b) do
    if String.valid?(b), do: [str_header(byte_size(b)), b], else: [bin_header(byte_size(b)), b]
  end

  defp int(i) when i >= 0 do
    cond do
      i < 0x100 -> <<0xCC, i>>
      i < 0x10000 -> <<0xCD, i::16>>
      i < 0x100000000 -> <<0xCE, i::32>>
      i < 0x10000000000000000 -> <<0xCF, i::64>>
      true -> big(i)
    end
  end

  defp int(i) do
    cond do
      i >= -0x80 -> <<0xD0, i::signed-8>>
      i >= -0x8000 -> <<0xD1, i::signed-16>>
      i >= -0x80000000 -> <<0xD2, i::signed-32>>
      i >= -0x8000000000000000 -> <<0xD3, i::signed-64>>
      true -> big(i)
    end
  end

  defp big(i) do
    digits = Integer.to_string(i)
    [<<0x81, 0xB2, @int_tag>>, str_header(byte_size(digits)), digits]
  end

  defp ref(%Ref{session: s, epoch: e} = ref, ctx) do
    check_handle(s, e, "ref", ctx)
    tagged(@ref_tag, ref, ctx)
  end

  defp stream(%StreamRef{session: s, epoch: e} = stream, ctx) do
    check_handle(s, e, "stream", ctx)
    tagged(@stream_tag, stream, ctx)
  end

  defp check_handle(s, e, what, %{session: session, epoch: epoch}) do
    cond do
      e != epoch ->
        raise Error.new(
                :session_lost,
                "this #{what} of session #{inspect(s)} belongs to another server process " <>
                  "(epoch #{inspect(e)}, now #{inspect(epoch)}): its objects are gone"
              )

      session != nil and s != session ->
        raise Error.new(
                :session_mismatch,
                "a #{what} of session #{inspect(s)} was passed in session #{inspect(session)}"
              )

      session == nil ->
        raise Error.new(:bad_request, "a #{what} cannot be passed here")

      true ->
        :ok
    end
  end

  defp tagged(tag, %{session: s, id: id, slot: slot, generation: g, epoch: e}, %{protocol: p}) do
    key = if p >= 2, do: [s, id, slot, g, e], else: [s, id, slot, g]
    [0x81, str_header(byte_size(tag)), tag | enc(key, %{session: nil, epoch: nil, protocol: p})]
  end

  defp refuse(message), do: raise(Error.new(:bad_request, message))

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

  # -- decoding ---------------------------------------------------------------------------------

  @doc """
  Decode one msgpack object. `default_epoch` is given to refs without one (a protocol 1 server).
  Returns `{:error, reason}` for malformed input, never raises.
  """
  @spec decode(binary(), String.t() | nil) :: {:ok, term()} | {:error, term()}
  def decode(binary, default_epoch \\ nil) when is_binary(binary) do
    Process.put(:pool_bridge_epoch, default_epoch)

    case dec(binary) do
      {value, <<>>} -> {:ok, value}
      {_value, rest} -> {:error, {:trailing_bytes, byte_size(rest)}}
    end
  rescue
    e in [MatchError, FunctionClauseError, CaseClauseError, ArgumentError] -> {:error, {:invalid, e}}
  after
    Process.delete(:pool_bridge_epoch)
  end

  @doc """
  The value of an ok reply, `{"id": _, "status": "ok", "value": value}` as the server writes it
  (in that order), decoded without building the reply map: `{:ok, value}`, or `:error` for any
  other frame (an error reply, another layout), which `decode/2` then reads in full.
  """
  @spec ok_value(binary(), String.t() | nil) :: {:ok, term()} | :error
  def ok_value(<<0x83, 0xA2, "id", rest::binary>>, default_epoch) do
    case skip_id(rest) do
      <<0xA6, "status", 0xA2, "ok", 0xA5, "value", value::binary>> ->
        case decode(value, default_epoch) do
          {:ok, _} = ok -> ok
          {:error, _} -> :error
        end

      _ ->
        :error
    end
  end

  def ok_value(_frame, _default_epoch), do: :error

  defp skip_id(<<i, r::binary>>) when i < 0x80, do: r
  defp skip_id(<<0xCC, _, r::binary>>), do: r
  defp skip_id(<<0xCD, _::16, r::binary>>), do: r
  defp skip_id(<<0xCE, _::32, r::binary>>), do: r
  defp skip_id(<<0xCF, _::64, r::binary>>), do: r
  defp skip_id(_), do: :error

  @doc """
  The `id` of a reply frame without decoding the rest (the server writes `id` first); `:error` if
  the frame does not start that way. The port owner routes replies with this alone.
  """
  @spec peek_id(binary()) :: {:ok, term()} | :error
  def peek_id(<<m, 0xA2, "id", rest::binary>>) when m in 0x81..0x8F, do: peek(rest)
  def peek_id(_), do: :error

  defp peek(<<i, _::binary>>) when i < 0x80, do: {:ok, i}
  defp peek(<<0xCC, i, _::binary>>), do: {:ok, i}
  defp peek(<<0xCD, i::16, _::binary>>), do: {:ok, i}
  defp peek(<<0xCE, i::32, _::binary>>), do: {:ok, i}
  defp peek(<<0xCF, i::64, _::binary>>), do: {:ok, i}
  defp peek(<<0xC0, _::binary>>), do: {:ok, nil}
  defp peek(_), do: :error

  defp dec(<<b, r::binary>>) when b < 0x80, do: {b, r}
  defp dec(<<b, r::binary>>) when b >= 0xE0, do: {b - 0x100, r}
  defp dec(<<b, r::binary>>) when b >= 0xA0 and b <= 0xBF, do: str(r, b - 0xA0)
  defp dec(<<b, r::binary>>) when b >= 0x90 and b <= 0x9F, do: dec_list(r, b - 0x90, [])
  defp dec(<<b, r::binary>>) when b >= 0x80 and b <= 0x8F, do: dec_map(r, b - 0x80)
  defp dec(<<0xC0, r::binary>>), do: {nil, r}
  defp dec(<<0xC2, r::binary>>), do: {false, r}
  defp dec(<<0xC3, r::binary>>), do: {true, r}
  defp dec(<<0xC4, n, r::binary>>), do: bin(r, n)
  defp dec(<<0xC5, n::16, r::binary>>), do: bin(r, n)
  defp dec(<<0xC6, n::32, r::binary>>), do: bin(r, n)
  defp dec(<<0xC7, n, t::signed-8, r::binary>>), do: ext(t, r, n)
  defp dec(<<0xC8, n::16, t::signed-8, r::binary>>), do: ext(t, r, n)
  defp dec(<<0xC9, n::32, t::signed-8, r::binary>>), do: ext(t, r, n)
  defp dec(<<0xCA, bits::binary-size(4), r::binary>>), do: {float(bits), r}
  defp dec(<<0xCB, bits::binary-size(8), r::binary>>), do: {float(bits), r}
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
  defp dec(<<0xD9, n, r::binary>>), do: str(r, n)
  defp dec(<<0xDA, n::16, r::binary>>), do: str(r, n)
  defp dec(<<0xDB, n::32, r::binary>>), do: str(r, n)
  defp dec(<<0xDC, n::16, r::binary>>), do: dec_list(r, n, [])
  defp dec(<<0xDD, n::32, r::binary>>), do: dec_list(r, n, [])
  defp dec(<<0xDE, n::16, r::binary>>), do: dec_map(r, n)
  defp dec(<<0xDF, n::32, r::binary>>), do: dec_map(r, n)

  defp str(r, n) do
    <<s::binary-size(n), rest::binary>> = r
    {s, rest}
  end

  defp bin(r, n) do
    <<s::binary-size(n), rest::binary>> = r
    {%Bytes{data: s}, rest}
  end

  defp ext(type, r, n) do
    <<data::binary-size(n), rest::binary>> = r
    {{:ext, type, data}, rest}
  end

  defp float(<<f::float-32>>), do: f
  defp float(<<f::float-64>>), do: f
  defp float(<<sign::1, _::bitstring>> = bits), do: special(bits, sign)

  defp special(bits, sign) do
    mantissa_bits = if bit_size(bits) == 32, do: 23, else: 52
    mantissa = :binary.decode_unsigned(bits) &&& (1 <<< mantissa_bits) - 1

    cond do
      mantissa != 0 -> :nan
      sign == 0 -> :infinity
      true -> :neg_infinity
    end
  end

  defp dec_list(r, 0, acc), do: {:lists.reverse(acc), r}

  defp dec_list(r, n, acc) do
    {v, r} = dec(r)
    dec_list(r, n - 1, [v | acc])
  end

  defp dec_map(r, 1) do
    {k, r} = dec(r)
    {v, r} = dec(r)
    {single(k, v), r}
  end

  defp dec_map(r, n), do: dec_pairs(r, n, [])

  defp dec_pairs(r, 0, acc), do: {:maps.from_list(acc), r}

  defp dec_pairs(r, n, acc) do
    {k, r} = dec(r)
    {v, r} = dec(r)
    dec_pairs(r, n - 1, [{k, v} | acc])
  end

  # A map with one of the reserved single keys is a tagged value, never a plain map.
  defp single(@ref_tag, key), do: handle(Ref, key)
  defp single(@stream_tag, key), do: handle(StreamRef, key)
  defp single(@int_tag, digits) when is_binary(digits), do: String.to_integer(digits)
  defp single(k, v), do: %{k => v}

  defp handle(mod, [s, id, slot, g, e]),
    do: struct!(mod, session: s, id: id, slot: slot, generation: g, epoch: e)

  defp handle(mod, [s, id, slot, g]),
    do: struct!(mod, session: s, id: id, slot: slot, generation: g, epoch: Process.get(:pool_bridge_epoch))
end
