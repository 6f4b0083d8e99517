defmodule PoolBridge.Options do
  @moduledoc """
  Checking the options of `PoolBridge.start_link/1` (and of each call), with errors that name the
  option, what it must be and what was given. Hand-written (no NimbleOptions: no Hex dependencies).
  """

  @pool_schema [
    name: {:name, nil, "an atom, {:global, term} or {:via, module, term}"},
    workers: {:pos_integer, :schedulers, "a positive integer (worker processes)"},
    python: {:string, "python3", "the Python executable, a non-empty string"},
    helpers: {:strings, [], "a list of module names (strings) passed as --helpers"},
    allow_modules: {:strings, [], "a list of patterns (strings) passed as --allow-module"},
    server_args: {:strings, [], "a list of extra command-line arguments (strings)"},
    env: {:env, [], "a list or map of {\"NAME\", \"value\"} strings for the server's environment"},
    cd: {:string_or_nil, nil, "a directory (string) to start the server in"},
    mode: {{:in, [:fds, :stdio]}, :fds, ":fds (Port fds 3/4) or :stdio"},
    start_timeout: {:pos_integer, 30_000, "a positive integer (ms to wait for the server's hello)"},
    timeout: {:timeout, 5_000, "a positive integer (ms) or :infinity (default per-call timeout)"},
    max_pending: {:pos_integer, 10_000, "a positive integer (requests in flight from this client)"},
    max_frame: {:pos_integer_or_nil, nil, "a positive integer (bytes), passed as --max-frame"},
    max_refs: {:pos_integer_or_nil, nil, "a positive integer, passed as --max-refs"},
    session_ttl: {:pos_number_or_nil, nil, "a positive number (seconds), passed as --session-ttl"}
  ]

  @call_schema [
    session: {:session, nil, "a session id: a string of 1 to 256 UTF-8 bytes"},
    timeout: {:timeout, nil, "a positive integer (ms) or :infinity"},
    kwargs: {:kwargs, %{}, "a map or keyword list of keyword arguments"},
    ret: {{:in, [:auto, :ref, :value, "auto", "ref", "value"]}, nil, ":auto, :ref or :value"},
    batch: {:pos_integer_or_nil, nil, "a positive integer (stream items per round trip)"},
    when_busy: {{:in, [:wait, :error]}, :wait, ":wait or :error (what to do at max_pending)"},
    on_timeout: {{:in, [:keep, :restart]}, :keep, ":keep or :restart (the worker, at the timeout)"}
  ]

  @doc "Validate the options of `PoolBridge.start_link/1`; raises `ArgumentError` naming the bad one."
  @spec validate_pool!(keyword()) :: keyword()
  def validate_pool!(opts), do: validate!(opts, @pool_schema, "PoolBridge.start_link/1")

  @doc "Validate the options of one call; raises `ArgumentError` naming the bad one."
  @spec validate_call!(keyword(), [atom()]) :: keyword()
  def validate_call!([], _allowed), do: []

  def validate_call!(opts, allowed) do
    schema = Keyword.take(@call_schema, allowed)

    if Keyword.keyword?(opts) do
      Enum.each(opts, fn {key, value} ->
        case Keyword.fetch(schema, key) do
          {:ok, {type, _default, what}} -> check!(type, key, value, what, "call")
          :error -> unknown!(key, schema, "this call")
        end
      end)

      opts
    else
      raise ArgumentError, "call options must be a keyword list, got: #{inspect(opts)}"
    end
  end

  defp validate!(opts, schema, where) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError, "#{where} expects a keyword list of options, got: #{inspect(opts)}"
    end

    for {key, _} <- opts, not Keyword.has_key?(schema, key), do: unknown!(key, schema, where)

    for {key, {type, default, what}} <- schema do
      value =
        case Keyword.fetch(opts, key) do
          {:ok, value} -> check!(type, key, value, what, where)
          :error when default == :schedulers -> System.schedulers_online()
          :error -> default
        end

      {key, value}
    end
  end

  defp unknown!(key, schema, where) do
    known = schema |> Keyword.keys() |> Enum.map_join(", ", &inspect/1)
    raise ArgumentError, "unknown option #{inspect(key)} for #{where}; known options: #{known}"
  end

  defp check!(type, key, value, what, where) do
    if valid?(type, value) do
      value
    else
      raise ArgumentError,
            "invalid value for #{inspect(key)} (#{where}): expected #{what}, got: #{inspect(value)}"
    end
  end

  @doc "Is this a valid session id (a string of 1 to 256 UTF-8 bytes)?"
  @spec session?(term()) :: boolean()
  def session?(s), do: is_binary(s) and byte_size(s) in 1..256 and String.valid?(s)

  defp valid?(:name, v), do: is_atom(v) or match?({:global, _}, v) or match?({:via, m, _} when is_atom(m), v)
  defp valid?(:pos_integer, v), do: is_integer(v) and v > 0
  defp valid?(:pos_integer_or_nil, v), do: is_nil(v) or (is_integer(v) and v > 0)
  defp valid?(:pos_number_or_nil, v), do: is_nil(v) or (is_number(v) and v > 0)
  defp valid?(:string, v), do: is_binary(v) and v != ""
  defp valid?(:string_or_nil, v), do: is_nil(v) or (is_binary(v) and v != "")
  defp valid?(:strings, v), do: is_list(v) and Enum.all?(v, &is_binary/1)
  defp valid?(:timeout, v), do: v == :infinity or (is_integer(v) and v > 0)
  defp valid?(:session, v), do: session?(v)
  defp valid?(:kwargs, v), do: is_map(v) or Keyword.keyword?(v)
  defp valid?({:in, values}, v), do: v in values

  defp valid?(:env, v) when is_map(v), do: valid?(:env, Map.to_list(v))

  defp valid?(:env, v),
    do: is_list(v) and Enum.all?(v, &match?({k, s} when is_binary(k) and is_binary(s), &1))
end
