defmodule PoolBridge.DemoTest do
  use ExUnit.Case, async: false
  import ExUnit.CaptureIO

  test "demo.exs runs and prints the tour" do
    out = capture_io(fn -> Code.eval_file(Path.expand("../demo.exs", __DIR__)) end)
    assert out =~ "math.sqrt(2) = 1.4142135623730951"
    assert out =~ "sha256(<<1, 2, 3>>) = 039058c6f2c0cb492c533b0a4d14ef77cc0f78abccced5287d84a1a2011cfb81"
    assert out =~ "alice's ref in bob's session -> session_mismatch"
    assert out =~ "sum of squares 1..100 = 338350"
  end
end
