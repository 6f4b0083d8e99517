"""The physical-limit baseline for large values: a child that moves raw bytes over pipes or a socket.

Run as ``python benchmarks/_raw_bulk.py READ_FD WRITE_FD``. Requests are a 1-byte op and an 8-byte
big-endian size:

* ``L n`` + n bytes: read them into a new buffer of n bytes, reply with the 8-byte size
  (what a transport does for ``len(data)`` in the child: the bytes must exist there);
* ``G n``: reply with n bytes of a buffer made once (a result the child already holds);
* ``E n`` + n bytes: read them and send them back (an echo).
"""

import os
import struct
import sys

_REQ = struct.Struct(">cQ")


def read_into(fd: int, view: memoryview) -> None:
    while view:
        n = os.readv(fd, [view])
        if not n:
            raise EOFError
        view = view[n:]


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> None:
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    blobs: dict[int, bytes] = {}
    head = bytearray(_REQ.size)
    while True:
        try:
            read_into(rfd, memoryview(head))
        except EOFError:
            return
        op, n = _REQ.unpack(head)
        if op == b"G":
            blob = blobs.get(n)
            if blob is None:
                blob = blobs[n] = os.urandom(n)
            write_all(wfd, blob)
            continue
        buf = bytearray(n)
        read_into(rfd, memoryview(buf))
        write_all(wfd, struct.pack(">Q", len(buf)) if op == b"L" else buf)


if __name__ == "__main__":
    main()
