"""Alternative channel backends for :class:`poolbridge.Pool` (``backend=...``)."""
