defmodule PoolBridge.Hash do
  @moduledoc """
  Session routing, computed in Elixir exactly as docs/hashing.md specifies:
  `slot = jump_hash(stable_hash64(session_id), n_slots)`. No round trip to the server.
  """
  import Bitwise

  @mask64 0xFFFF_FFFF_FFFF_FFFF
  @lcg_mul 2_862_933_555_777_941_757

  @doc "First 8 bytes of SHA-256 of the UTF-8 session id, as an unsigned big-endian integer."
  @spec stable_hash64(binary()) :: non_neg_integer()
  def stable_hash64(session_id) when is_binary(session_id) do
    <<h::unsigned-big-integer-size(64), _::binary>> = :crypto.hash(:sha256, session_id)
    h
  end

  @doc "Jump consistent hash (Lamping & Veach 2014) of an unsigned 64-bit key into `0..n_slots-1`."
  @spec jump_hash(non_neg_integer(), pos_integer()) :: non_neg_integer()
  def jump_hash(key, n_slots) when is_integer(key) and is_integer(n_slots) and n_slots > 0 do
    jump(band(key, @mask64), n_slots, -1, 0)
  end

  defp jump(_key, n_slots, b, j) when j >= n_slots, do: b

  defp jump(key, n_slots, _b, j) do
    key = band(key * @lcg_mul + 1, @mask64)
    # IEEE-754 doubles, as in the reference: 2^31 / ((key >>> 33) + 1), times (b + 1), truncated.
    jump(key, n_slots, j, trunc((j + 1) * (2_147_483_648.0 / ((key >>> 33) + 1))))
  end

  @doc "The slot a session id maps to among `n_slots` workers."
  @spec slot_for(String.t(), pos_integer()) :: non_neg_integer()
  def slot_for(session_id, n_slots), do: jump_hash(stable_hash64(session_id), n_slots)
end
