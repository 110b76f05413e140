"""The service's own settings (where it listens, who may call it, what a request may cost), checked once.

The model's options are :class:`idc_lite.cli.common.ModelOptions`, as for every command that runs a
model; these are the rest. Safe by default: loopback only, and any other address needs a token.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import OptionError
from ..runtime import is_loopback

#: Host names that reach only this machine.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_wait_ms: float = 10.0
    token: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_mb: float = 50.0
    max_queue: int = 64
    timeout_s: float = 60.0

    def __post_init__(self):
        if self.token is not None and not self.token.strip():
            raise OptionError(None, "--token must not be empty")
        if not is_loopback(self.host) and not self.token:
            raise OptionError(None, f"--host {self.host} lets other machines in: give --token (every request then "
                              "needs 'Authorization: Bearer <token>'), or keep the default 127.0.0.1")
        if not 0 <= self.port <= 65535:
            raise OptionError(None, f"--port must be 0..65535, not {self.port}")
        for name in ("max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise OptionError(None, f"--{name.replace('_', '-')} must be at least 1")
        if self.max_wait_ms < 0 or self.timeout_s <= 0 or self.max_body_mb <= 0:
            raise OptionError(None, "--max-wait-ms must be at least 0, --timeout and --max-body-mb above 0")
        for origin in self.cors_origins:
            parts = urlsplit(origin)
            exact = parts.scheme in ("http", "https") and parts.netloc and parts.path in ("", "/")
            if origin == "*" or not exact:
                raise OptionError(None, f"--cors-origin {origin!r}: give an origin such as https://editor.example "
                                  "(scheme and host, no path, no wildcard)")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(origin.rstrip("/").lower() for origin in self.cors_origins)
