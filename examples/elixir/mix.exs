defmodule PoolBridge.MixProject do
  use Mix.Project

  # No Hex dependencies on purpose: CI cannot reach Hex, and an app adds this package as a path or
  # git dependency. `:telemetry` is used when the app has it loaded (see PoolBridge.Telemetry).
  def project do
    [
      app: :pool_bridge,
      version: "0.2.0",
      elixir: "~> 1.14",
      elixirc_paths: elixirc_paths(Mix.env()),
      start_permanent: Mix.env() == :prod,
      elixirc_options: [warnings_as_errors: true],
      deps: [],
      description: "Elixir client for poolbridge: a Python worker pool with per-session affinity",
      test_coverage: [summary: [threshold: 0]]
    ]
  end

  def application do
    [extra_applications: [:logger, :crypto]]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
