"""Who may talk to the server: checks on every HTTP request before any route runs (app.py applies them as ASGI
middleware). Pure functions of the method, path and headers, so each rule is testable without a server.

What they stop, for a server on a laptop (127.0.0.1):
  * DNS rebinding: a web page on attacker.example re-points its name at 127.0.0.1, and the browser then sends the
    page's requests to us as same-origin. The Host header still says attacker.example: only the allowed host names
    are served (the loopback names by default; `--allowed-hosts` for a server reached under other names).
  * Cross-site requests: any page may POST to http://127.0.0.1:8000 with a "simple" request (text/plain, no
    preflight), and a browser sends it. So a POST must be `Content-Type: application/json` (which no page can send
    cross-origin without a CORS preflight, which we never grant), and a request whose Origin is another site's is
    refused.
  * Other users of a shared or exposed machine: with `--api-key`, the API routes need `Authorization: Bearer <key>`,
    as vLLM and the OpenAI clients send it. The page (/) and /health stay open; the page asks for the key.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from picochat.serve.protocol import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = ("/", "/health")  # served without the API key: the page itself and a liveness probe


def _host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind: str) -> tuple[str, ...]:
    """Bound to loopback: the loopback names only. Bound to one address: that address too. Bound to every interface
    (0.0.0.0, ::): this machine's name and its addresses as the resolver lists them; other names need
    --allowed-hosts."""
    if is_loopback(bind):
        return LOOPBACK_NAMES
    if bind not in ("0.0.0.0", "::"):
        return (*LOOPBACK_NAMES, bind.lower())
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    try:
        names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:  # no resolvable name: the machine's name alone
        pass
    return tuple(dict.fromkeys([*LOOPBACK_NAMES, *sorted(names)]))


def parse_allowed_hosts(value: str, bind: str) -> tuple[str, ...]:
    """--allowed-hosts: '' = the default for `bind`; '*' = any Host (no DNS-rebinding check); else comma-separated
    names (ports are ignored)."""
    if not value.strip():
        return default_allowed_hosts(bind)
    return tuple(sorted({_host_name(h) for h in value.split(",") if h.strip()}))


@dataclass(frozen=True)
class Guard:
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # "*" in it: any
    api_key: str | None = None

    def _host_ok(self, name: str) -> bool:
        return "*" in self.allowed_hosts or name in self.allowed_hosts

    def check(self, method: str, path: str, headers: dict[str, str]) -> ApiError | None:
        """The error to answer instead of running the route, or None. `headers`: lower-case names."""
        host = _host_name(headers.get("host", ""))
        if not self._host_ok(host):
            return ApiError(403, f"Host '{host}' is not served here (a DNS-rebinding guard); start the server with "
                                 f"--allowed-hosts {host} to serve it under that name", type="permission_error",
                            code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if origin == "null" or not parts.hostname or not self._host_ok(parts.hostname.lower()):
                return ApiError(403, f"requests from the web page at {origin[:80]} are not allowed: this server "
                                     f"answers its own page and non-browser clients", type="permission_error",
                                code="origin_not_allowed")
        if method == "POST":
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return ApiError(415, f"a POST body must be sent as 'Content-Type: application/json', got "
                                     f"'{ctype or 'none'}'", code="unsupported_media_type")
        if self.api_key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key the "
                                     "server was started with (--api-key)", type="authentication_error",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None
