"""`orchestrator ui`: a stdlib HTTP server for the static front end and the JSON API.

Loopback by default. Any other interface needs a token, checked on every request (header
`X-Token`, cookie `orchestrator_token`, or `?token=` which also sets the cookie). On loopback
without a token, the Host header must name loopback too, so a web page on another site cannot
reach the API through DNS rebinding.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import re
import socket
import threading
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from orchestrator.errors import UserError
from orchestrator.store import Store
from orchestrator.ui.api import Api, NotFound

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
COOKIE = "orchestrator_token"
TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]{8,}")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    server: UIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args) -> None:  # quiet: one line per request would drown the terminal
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        set_cookie = None
        if not self._host_allowed():
            return self._send(403, b"forbidden host\n", "text/plain")
        if self.server.token is not None:
            given = self.headers.get("X-Token") or query.get("token") or self._cookie()
            if not given or not hmac.compare_digest(given.encode(), self.server.token.encode()):
                return self._send(401, b"missing or wrong token (open the URL that `orchestrator ui` printed)\n",
                                  "text/plain")
            if query.get("token"):
                set_cookie = f"{COOKIE}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"
        if url.path == "/favicon.ico":  # none: say so without an error in the console
            return self._send(204, b"", "image/x-icon")
        if url.path.startswith("/api/"):
            return self._api(url.path[len("/api/"):], query)
        return self._static(url.path, set_cookie)

    def _host_allowed(self) -> bool:
        if self.server.token is not None:
            return True
        host = self.headers.get("Host") or ""
        name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        return is_loopback(name)

    def _cookie(self) -> str | None:
        jar = SimpleCookie(self.headers.get("Cookie") or "")
        return jar[COOKIE].value if COOKIE in jar else None

    def _api(self, path: str, query: dict) -> None:
        try:
            body = self.server.api.get(path, query)
            code = 200
        except NotFound as e:
            body, code = {"error": str(e)}, 404
        except (UserError, ValueError) as e:
            body, code = {"error": str(e)}, 400
        try:
            data = json.dumps(body, allow_nan=False, default=str).encode()
        except ValueError:  # a NaN/inf somewhere (an alert about a NaN loss): JSON has no such numbers
            data = json.dumps(_finite(body), allow_nan=False, default=str).encode()
        self._send(code, data, "application/json", cache="no-store")

    def _static(self, path: str, set_cookie: str | None) -> None:
        name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
        file = (STATIC / name).resolve()
        if file.parent != STATIC.resolve() or not file.is_file() or file.suffix not in TYPES:
            return self._send(404, b"not found\n", "text/plain")
        self._send(200, file.read_bytes(), TYPES[file.suffix], cache="no-cache", cookie=set_cookie)

    def _send(self, code: int, body: bytes, ctype: str, cache: str = "no-store", cookie: str | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        if cookie:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the page navigated away mid-request
            self.close_connection = True


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


class UIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, api: Api, token: str | None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.api = api
        self.token = token


def make_server(*, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                store: Store | None = None) -> UIServer:
    if not is_loopback(host) and not token:
        raise UserError(f"refusing to serve on {host} without --token (anyone on the network could read your runs)")
    if token is not None and not TOKEN_CHARS.fullmatch(token):
        raise UserError("--token must be 8+ characters from A-Z a-z 0-9 - _ . ~ (it travels in a URL and a cookie)")
    return UIServer((host, port), Api(store or Store()), token)


def url_of(server: UIServer, host: str) -> str:
    port = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={server.token}" if server.token else "")


def start_in_thread(**kwargs) -> tuple[UIServer, threading.Thread]:
    """For tests and benchmarks: serve in a daemon thread; the bound port is server.server_address[1]."""
    server = make_server(**kwargs)
    thread = threading.Thread(target=server.serve_forever, name="orchestrator-ui", daemon=True)
    thread.start()
    return server, thread


def serve(*, host: str = "127.0.0.1", port: int = 8080, token: str | None = None, out=print) -> None:
    try:
        server = make_server(host=host, port=port, token=token)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    out(f"orchestrator UI for {server.api.store.path} at {url_of(server, host)}  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        out("stopped")
    finally:
        server.server_close()
