"""The raw Elixir↔Python Port baseline for bench_port.exs: ``{packet, 4}`` msgpack on stdio.

For a request map ``{"id", "op", "session", "fn", "args": [a, b]}`` it replies
``{"id", "status": "ok", "value": a + b}`` — the same bytes the Port server answers to
``call operator.add`` — with nothing else in between: no router, no worker, no second hop.
"""

import os
import struct

import msgpack


def main() -> None:
    rfd, wfd = 0, 1
    buf = bytearray()
    while True:
        data = os.read(rfd, 1 << 16)
        if not data:
            return
        buf += data
        out = []
        while len(buf) >= 4:
            (n,) = struct.unpack_from(">I", buf)
            if len(buf) < 4 + n:
                break
            req = msgpack.unpackb(bytes(buf[4 : 4 + n]), raw=False)
            del buf[: 4 + n]
            a, b = req["args"]
            body = msgpack.packb({"id": req["id"], "status": "ok", "value": a + b})
            out.append(struct.pack(">I", len(body)) + body)
        if out:
            os.write(wfd, b"".join(out))


if __name__ == "__main__":
    main()
