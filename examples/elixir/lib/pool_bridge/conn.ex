defmodule PoolBridge.Conn do
  @moduledoc false
  # What a caller needs to talk to one running pool instance without going through its owner:
  # the Port (callers write their own frames), the pending table (id -> reply alias) and the
  # counters (1: next request id, 2: requests pending). Handed out by the owner once it has the
  # server's hello, cached in each caller's process dictionary under the owner's pid.

  @enforce_keys [:owner, :port, :table, :counters]
  defstruct [
    :owner,
    :port,
    :table,
    :counters,
    :max_pending,
    :slots,
    :epoch,
    :protocol,
    :hello,
    :default_timeout,
    telemetry: false
  ]

  @type t :: %__MODULE__{
          owner: pid(),
          port: port(),
          table: :ets.tid(),
          counters: :atomics.atomics_ref(),
          max_pending: pos_integer(),
          slots: pos_integer(),
          epoch: String.t(),
          protocol: pos_integer(),
          hello: map(),
          default_timeout: timeout(),
          telemetry: boolean()
        }

  @doc false
  # The current slot count: the hello's, then each `resized` notice's (shared by every copy).
  @spec slots(t()) :: pos_integer()
  def slots(%__MODULE__{counters: c}), do: :atomics.get(c, 3)

  @doc false
  @spec next_id(t()) :: pos_integer()
  def next_id(%__MODULE__{counters: c}), do: :atomics.add_get(c, 1, 1)
end
