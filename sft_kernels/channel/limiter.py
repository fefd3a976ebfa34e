"""Link emulation on the sending side: a token bucket for bandwidth plus a fixed one-way latency.

Used to run the split training over a loopback socket as if the edge sat behind a 10 / 100 /
1000 Mbps link.  The connection calls :meth:`LinkLimiter.frame_delay` once per frame and
:meth:`LinkLimiter.consume` per chunk it sends, so a large frame is paced rather than sent in one
burst.  One limiter may be shared by several connections (they then share the bandwidth).
"""
from __future__ import annotations

import math
import threading
import time

from .tuning import BURST_BYTES


class LinkLimiter:
    """Token bucket at ``mbps`` megabit/s (``None`` or 0 = unlimited) and ``latency_ms`` per frame.

    ``mbps`` counts 10**6 bits per second; ``latency_ms`` is slept before each frame is sent
    (one-way delay).  Thread-safe.
    """

    def __init__(self, mbps: float | None = None, latency_ms: float = 0.0) -> None:
        if mbps is not None and (not isinstance(mbps, (int, float)) or not math.isfinite(mbps) or mbps < 0):
            raise ValueError(f"mbps must be a finite number >= 0 (0 or None = unlimited), got {mbps!r}")
        if not isinstance(latency_ms, (int, float)) or not math.isfinite(latency_ms) or latency_ms < 0:
            raise ValueError(f"latency_ms must be a finite number >= 0, got {latency_ms!r}")
        self.mbps = float(mbps) if mbps else None
        self.latency_ms = float(latency_ms)
        self._rate = self.mbps * 1e6 / 8 if self.mbps else None  # bytes per second
        self._tokens = float(BURST_BYTES)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    @property
    def unlimited(self) -> bool:
        """True when neither bandwidth nor latency is limited (the connection then skips the limiter)."""
        return self._rate is None and self.latency_ms == 0

    def frame_delay(self) -> None:
        """Sleep the one-way latency; called once before each frame."""
        if self.latency_ms > 0:
            time.sleep(self.latency_ms / 1e3)

    def consume(self, nbytes: int) -> None:
        """Take ``nbytes`` tokens, sleeping as long as the bucket is in debt."""
        if self._rate is None or nbytes <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(BURST_BYTES), self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)

    def __repr__(self) -> str:
        return f"LinkLimiter(mbps={self.mbps}, latency_ms={self.latency_ms})"
