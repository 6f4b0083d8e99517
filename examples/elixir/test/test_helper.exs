# The suite drives the real `python -m poolbridge serve` of this checkout through a real Port.
# Tests tagged :v2 need a protocol-2 server (cancel, epochs in refs, router-answered ping); they
# are excluded, with a notice, when the server of this checkout still speaks protocol 1.
probe = PoolBridge.TestSupport.start_pool(workers: 1)
{:ok, %{protocol: protocol}} = PoolBridge.info(probe)
PoolBridge.close(probe)

exclude =
  if protocol < 2 do
    IO.puts("NOTE: the server speaks protocol #{protocol}: tests tagged :v2 are excluded")
    [:v2]
  else
    []
  end

ExUnit.start(exclude: exclude, timeout: 60_000, max_cases: 4)
