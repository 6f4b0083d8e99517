defmodule PoolBridge.Ref do
  @moduledoc """
  A handle to a Python object kept alive in a worker.

  A ref belongs to one session (`session`) and so to one worker (`slot`, `generation`) of one
  server process (`epoch`). It routes itself: an operation on a ref runs in the ref's session,
  whatever `with_session/3` or the auto-session say, and a `session:` option that disagrees is a
  `:session_mismatch`. After the server restarted (another `epoch`) or the worker did (another
  `generation`), using the ref gives `:session_lost` — never another object.

  Treat the fields as read-only: the server checks every one of them.
  """

  @enforce_keys [:session, :id, :slot, :generation, :epoch]
  defstruct [:session, :id, :slot, :generation, :epoch]

  @type t :: %__MODULE__{
          session: String.t(),
          id: integer(),
          slot: non_neg_integer(),
          generation: non_neg_integer(),
          epoch: String.t()
        }
end

defmodule PoolBridge.StreamRef do
  @moduledoc false
  # The server's stream handle (`__poolbridge_stream__`). Internal: `PoolBridge.stream/4` wraps it
  # in a lazy Enumerable, so applications never hold one.
  @enforce_keys [:session, :id, :slot, :generation, :epoch]
  defstruct [:session, :id, :slot, :generation, :epoch]

  @type t :: %__MODULE__{
          session: String.t(),
          id: integer(),
          slot: non_neg_integer(),
          generation: non_neg_integer(),
          epoch: String.t()
        }
end

defmodule PoolBridge.Bytes do
  @moduledoc """
  Raw bytes: msgpack `bin`, Python `bytes`.

  The binary rule of this package: a binary that is valid UTF-8 travels as a msgpack `str`
  (a Python `str`); any other binary, and any binary wrapped with `PoolBridge.bytes/1`, travels as
  `bin` (Python `bytes`). In replies a Python `bytes` always comes back wrapped in this struct,
  so bytes round-trip as bytes even when they happen to be valid UTF-8.
  """

  @enforce_keys [:data]
  defstruct [:data]

  @type t :: %__MODULE__{data: binary()}
end
