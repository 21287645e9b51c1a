"""Options of `imgindex serve`: each default defined once, here; the CLI reads them and every replica gets the object.

Imports nothing heavy, so building the command line parser does not import Ray Serve or FastAPI.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from embedder.config import UserError


def parse_replicas(text: str) -> int | tuple[int, int]:
    """`N` (a fixed number of replicas) or `MIN-MAX` (Serve autoscaling between the two)."""
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise UserError(f"--replicas {text}: expected N or MIN-MAX, e.g. 2 or 1-4") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise UserError(f"--replicas {text}: need 1 <= MIN <= MAX")
    return bounds[0] if bounds[0] == bounds[1] else bounds


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeOptions:
    """Where the service listens, how many replicas, the token, and what one replica accepts and holds: upload size,
    concurrency, queue (beyond which Serve answers 503)."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: str = "1"
    allow_remote: bool = False
    token_file: str | None = None
    weights: str | None = None
    address: str | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 50_000_000
    max_ongoing_requests: int = 16
    max_queued_requests: int = 32
    max_batch_size: int = 8

    @property
    def scale(self) -> int | tuple[int, int]:
        """--replicas as a fixed count or an autoscaling (MIN, MAX)."""
        return parse_replicas(self.replicas)

    def validate(self) -> "ServeOptions":
        """Check every field; raise UserError with what to change."""
        parse_replicas(self.replicas)
        if not 1 <= self.port <= 65535:
            raise UserError(f"--port must be between 1 and 65535, not {self.port}")
        if not is_loopback(self.host) and not self.allow_remote:
            raise UserError(f"--host {self.host} is reachable from other machines; add --allow-remote if that is intended")
        for name in ("max_upload_bytes", "max_upload_pixels", "max_ongoing_requests", "max_queued_requests", "max_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        return self
