"""The physical-limit baseline: a child that answers length-prefixed msgpack frames on two pipes.

Run as ``python benchmarks/_raw_echo.py READ_FD WRITE_FD``. For ``[id, a, b]`` it replies
``[id, a + b]`` — the same work as ``pool.call("operator.add", a, b)`` minus everything poolbridge adds.
"""

import os
import struct
import sys

import msgpack


def main() -> None:
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
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
            req_id, a, b = msgpack.unpackb(bytes(buf[4 : 4 + n]))
            del buf[: 4 + n]
            body = msgpack.packb([req_id, a + b])
            out.append(struct.pack(">I", len(body)) + body)
        if out:
            os.write(wfd, b"".join(out))


if __name__ == "__main__":
    main()
