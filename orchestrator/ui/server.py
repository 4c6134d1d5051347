"""`orchestrator ui`: a stdlib HTTP server for the static front end and the JSON API.

Loopback by default. With a token (required on any other interface, optional on loopback) it is
checked on every request: header `X-Token`, cookie `orchestrator_token`, or `?token=` which also
sets the cookie. On loopback without a token, the Host header must name loopback too, so a web
page on another site cannot reach the API through DNS rebinding.

Connections are collected by connections.py (no thread per idle client, a bounded worker pool);
every answer, errors included, is JSON except the static files.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import math
import re
import secrets
import threading
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from common.errors import UserError
from orchestrator.store import Store
from orchestrator.ui.api import Api, NotFound
from orchestrator.ui.connections import ConnectionServer, Limits
from orchestrator.ui.params import MAX_QUERY_FIELDS, BadRequest

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
log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(18)


class Handler(BaseHTTPRequestHandler):
    """One request whose head the connection layer has read; `rest` is what followed it on a
    connection that stays open (None: close it)."""

    server: UIServer
    protocol_version = "HTTP/1.1"

    def __init__(self, sock, addr, server: UIServer, head: bytes):
        self.head = head
        self.rest: bytes | None = None
        super().__init__(sock, addr, server)

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self.head)  # never the socket: a slow client cannot block a worker reading
        self.wfile = self.connection.makefile("wb")

    def handle(self) -> None:
        self.handle_one_request()
        if self.close_connection or self.command != "GET":
            return
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            return  # a GET with a body: not worth reading, so the connection cannot be reused
        self.rest = self.rfile.read()

    def finish(self) -> None:
        try:
            self.wfile.close()  # flushes
        except OSError:  # the client went away or stopped reading
            self.rest = None

    def log_message(self, fmt, *args) -> None:  # quiet: one line per request would drown the terminal
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (bad request line, unknown method, ...) as JSON too."""
        self.close_connection = True
        self.request_version = "HTTP/1.0"  # a status line even when the request looked like HTTP/0.9
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method without a do_ handler
            return self._json(405, {"error": f"method {self.command!r} not allowed: the UI is read-only, GET only"},
                              extra={"Allow": "GET"})
        self._json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def do_GET(self) -> None:
        try:
            self._get()
        except Exception:
            log.exception("ui: GET %s failed", self.path[:200])
            self._json(500, {"error": "internal error in the UI server (its log has the details)"})

    def _get(self) -> None:
        url = urlsplit(self.path)
        try:
            query = {k: v[-1] for k, v in parse_qs(url.query, max_num_fields=MAX_QUERY_FIELDS).items()}
        except ValueError:
            return self._json(400, {"error": f"too many query parameters (at most {MAX_QUERY_FIELDS})"})
        set_cookie = None
        if not self._host_allowed():
            return self._json(403, {"error": "forbidden Host header: without a token the UI answers only requests "
                                             "addressed to localhost, 127.0.0.1 or ::1"})
        if self.server.token is not None:
            given = self.headers.get("X-Token") or query.get("token") or self._cookie()
            if not given or not hmac.compare_digest(given.encode(), self.server.token.encode()):
                return self._json(401, {"error": "missing or wrong token: open the URL that `orchestrator ui` "
                                                 "printed (it carries the token)"})
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
        try:
            jar = SimpleCookie(self.headers.get("Cookie") or "")
        except CookieError:
            return None
        return jar[COOKIE].value if COOKIE in jar else None

    def _api(self, path: str, query: dict) -> None:
        try:
            body, code = self.server.api.get(path, query), 200
        except NotFound as e:
            body, code = {"error": str(e)}, 404
        except BadRequest as e:
            body, code = {"error": str(e)}, 400
        except UserError as e:  # the store cannot be read: not the client's fault
            log.warning("ui: %s: %s", path[:200], e)
            body, code = {"error": str(e)}, 500
        self._json(code, body)

    def _static(self, path: str, set_cookie: str | None) -> None:
        name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
        file = (STATIC / name).resolve()
        if file.parent != STATIC.resolve() or not file.is_file() or file.suffix not in TYPES:
            return self._json(404, {"error": f"no file {path[:200]}"})
        self._send(200, file.read_bytes(), TYPES[file.suffix], cache="no-cache", extra={"Set-Cookie": set_cookie})

    def _json(self, code: int, body, extra: dict | None = None) -> None:
        try:
            data = json.dumps(body, allow_nan=False, default=str).encode()
        except ValueError:  # a NaN/inf somewhere (an alert about a NaN loss): JSON has no such numbers
            data = json.dumps(_finite(body), allow_nan=False, default=str).encode()
        self._send(code, data, "application/json", extra=extra)

    def _send(self, code: int, body: bytes, ctype: str, cache: str = "no-store", extra: dict | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", cache)
            for k, v in {**SECURITY_HEADERS, **(extra or {})}.items():
                if v is not None:
                    self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:  # the page navigated away, or the client stopped reading (write timeout)
            self.close_connection = True


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


class UIServer(ConnectionServer):
    def __init__(self, address: tuple[str, int], api: Api, token: str | None, limits: Limits | None = None):
        super().__init__(address, limits)
        self.api = api
        self.token = token

    def handle(self, sock, addr, head: bytes) -> bytes | None:
        return Handler(sock, addr, self, head).rest


def make_server(*, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                store: Store | None = None, limits: Limits | None = None) -> UIServer:
    if not is_loopback(host) and not token:
        raise UserError(f"refusing to serve on {host} without a token (anyone on the network could read your runs):"
                        " add --token")
    if token is not None and not TOKEN_CHARS.fullmatch(token):
        raise UserError("--token must be 8+ characters from A-Z a-z 0-9 - _ . ~ (it travels in a URL and a cookie)")
    return UIServer((host, port), Api(store or Store()), token, limits)


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
    if token:
        access = "token required: open this URL, it carries the token"
    else:
        access = "no token: any local user can open it; `orchestrator ui --token` requires one"
    out(f"orchestrator UI at {url_of(server, host)}  ({access})  store {server.api.path}, Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        out("stopped")
    finally:
        server.server_close()
