"""Options of `imgindex serve`: each default defined once, here; the CLI reads them and every replica gets the object.

Imports nothing heavy, so building the command line parser does not import Ray Serve or FastAPI.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from cluster.options import cast_memory_to_bytes
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


def is_loopback_name(host: str) -> bool:
    """True for a Host header's host that only ever means this machine: a loopback address (IPv6 in brackets), or
    localhost and its subdomains, which browsers resolve to loopback themselves (RFC 6761), so no DNS answer can
    rebind them."""
    return host == "localhost" or host.endswith(".localhost") or is_loopback(host.removeprefix("[").removesuffix("]"))


def host_of(header: str) -> str:
    """The host part of a Host header (`name:port`, `[::1]:port`, `name`), lower case, without a trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.partition(":")[0].rstrip(".")


# A host name or address as --allow-host takes it: no port, scheme or path.
HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")


@dataclass(frozen=True)
class ServeOptions:
    """Where the service listens, how many replicas, the token, and what one replica accepts and holds: upload size,
    the time a request body may take to arrive, the memory decoding may take, concurrency, queue (beyond which Serve
    answers 503), the Host names it answers, and whether it serves its OpenAPI schema."""

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
    body_timeout_s: float = 30.0
    decode_memory: str = "2G"
    allow_hosts: tuple[str, ...] = ()
    openapi: bool = False

    @property
    def scale(self) -> int | tuple[int, int]:
        """--replicas as a fixed count or an autoscaling (MIN, MAX)."""
        return parse_replicas(self.replicas)

    @property
    def decode_memory_bytes(self) -> int:
        """--decode-memory in bytes: what the decodes running at once in one replica may allocate together."""
        return cast_memory_to_bytes(self.decode_memory, "--decode-memory")

    @property
    def upload_slots(self) -> int:
        """Uploads one replica works on at once: its max_ongoing_requests less a quarter of them (at least one) kept
        for every other request, so /healthz, path searches and thumbnails answer while uploads, stalled ones
        included, hold the rest. With max_ongoing_requests 1 nothing can be kept."""
        return max(1, self.max_ongoing_requests - max(1, self.max_ongoing_requests // 4))

    def admits_host(self, header: str | None) -> bool:
        """Whether a request with this Host header is answered: on a loopback --host, only loopback names and
        --allow-host names (a web page cannot then reach the service by DNS rebinding); on any other --host, only the
        --allow-host names when some are given, else any."""
        host = host_of(header or "")
        if host in self.allow_hosts:
            return True
        if is_loopback(self.host):
            return is_loopback_name(host)
        return not self.allow_hosts

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
        if not self.body_timeout_s > 0:
            raise UserError(f"--body-timeout-s must be more than 0 seconds, not {self.body_timeout_s}")
        if self.decode_memory_bytes < 1024**2:
            raise UserError(f"--decode-memory {self.decode_memory}: at least 1M, or no image could be decoded")
        for name in self.allow_hosts:
            if not HOST_NAME.fullmatch(name):
                raise UserError(f"--allow-host {name}: expected a lower-case host name or address, without port or scheme")
        return self
