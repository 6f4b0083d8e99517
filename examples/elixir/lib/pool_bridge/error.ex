defmodule PoolBridge.Error do
  @moduledoc """
  An error from the pool: every function returns `{:error, %PoolBridge.Error{}}` (or raises it from
  the `!` variants and from streams).

  `code` is an atom for every documented code — the server's (`:remote_error`, `:bad_request`,
  `:session_mismatch`, `:ref_not_found`, `:helper_not_found`, `:session_lost`, `:session_limit`,
  `:worker_crashed`, `:timeout`, `:cancelled`, `:busy`, `:pool_closed`, `:not_allowed`,
  `:frame_too_large`, `:misrouted`, `:internal`) and the client's own (`:timeout` when no reply
  came in time, `:busy` when the pending bound is reached with `when_busy: :error`,
  `:pool_closed` when the pool is not running or stopped while waiting, `:bad_request` for an
  argument that cannot be encoded, `:session_mismatch` / `:session_lost` decided before sending).
  A code this client does not know is kept as the server's string.

  `type`, `message` and `traceback` describe the remote exception (`traceback` is `""` for errors
  raised by the server or this client). `ran` is set for `:worker_crashed` (whether the request
  had been written to the worker that died).
  """

  defexception code: :internal, type: "", message: "", traceback: "", ran: nil

  @type t :: %__MODULE__{
          code: atom() | String.t(),
          type: String.t(),
          message: String.t(),
          traceback: String.t(),
          ran: boolean() | nil
        }

  @codes ~w(remote_error bad_request frame_too_large not_allowed session_mismatch ref_not_found
            helper_not_found session_lost session_limit worker_crashed timeout cancelled busy
            pool_closed misrouted internal)
  @code_atoms Map.new(@codes, &{&1, String.to_atom(&1)})

  @doc "The atom of a known error code; an unknown code stays a string."
  @spec code(String.t() | atom()) :: atom() | String.t()
  def code(code) when is_atom(code), do: code
  def code(code) when is_binary(code), do: Map.get(@code_atoms, code, code)

  @doc "Build an error of this client (no remote traceback)."
  @spec new(atom(), String.t(), String.t()) :: t()
  def new(code, message, type \\ "PoolBridge.Error"),
    do: %__MODULE__{code: code, type: type, message: message, traceback: ""}

  @doc "Build an error from the server's error map."
  @spec from_wire(map()) :: t()
  def from_wire(map) when is_map(map) do
    %__MODULE__{
      code: code(Map.get(map, "code", "internal")),
      type: text(Map.get(map, "type")),
      message: text(Map.get(map, "message")),
      traceback: text(Map.get(map, "traceback")),
      ran: Map.get(map, "ran")
    }
  end

  defp text(nil), do: ""
  defp text(s) when is_binary(s), do: s
  defp text(other), do: inspect(other)

  @impl true
  def message(%__MODULE__{code: code, type: type, message: message}) do
    "#{code}: " <> if(type in ["", "PoolBridge.Error"], do: message, else: "#{type}: #{message}")
  end
end
