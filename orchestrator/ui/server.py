"""`orchestrator server` (and its alias `orchestrator ui`): one stdlib HTTP server for

- the static front end and its read-only JSON API (api.py):        GET /, /static/..., /api/...
- the ingest API runs write through (ingest.py, RemoteStore):      POST /ingest/v1/batch, /ingest/v1/read
- the MLflow REST subset (mlflow_api.py):                          /api/2.0/mlflow/..., /ajax-api/2.0/mlflow/...

Loopback by default. With a token (required on any other interface, optional on loopback) it is
checked on every request: header `X-Token`, `Authorization: Bearer` (MLflow's client sends
MLFLOW_TRACKING_TOKEN so), cookie `orchestrator_token`, or `?token=` which also sets the cookie. On
loopback without a token, the Host header must name loopback too, so a web page on another site
cannot reach the API through DNS rebinding; and a POST must carry a Content-Type that a web page
cannot send without the browser asking first (CORS preflight, which is never granted), so a page
cannot write into the store either.

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
import signal
import threading
import time
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from common.errors import UserError
from orchestrator.store import Store, open_store
from orchestrator.ui.api import Api, NotFound
from orchestrator.ui.connections import ConnectionServer, Limits
from orchestrator.ui.ingest import Ingest
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
MAX_BODY = 64 * 2**20  # bytes of a POST body (RemoteStore's batches are at most 8 MiB)
BODY_TIMEOUT_S = 60.0  # to send a whole body
SIMPLE_TYPES = {"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}  # any page may POST these
MLFLOW_PREFIXES = ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/")
INGEST_PATHS = ("/ingest/v1/batch", "/ingest/v1/read")
# ingest requests wait for their commit: more workers than the UI alone needs
SERVER_LIMITS = Limits(workers=32, queue=480, pending=1024)
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
        self.after_body: bytes | None = None  # a POST's: what followed its body (None: body not read whole)
        super().__init__(sock, addr, server)

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self.head)  # never the socket: a slow client cannot block a worker reading
        self.wfile = self.connection.makefile("wb")

    def handle(self) -> None:
        self.handle_one_request()
        if self.close_connection:
            return
        if self.command == "POST":
            self.rest = self.after_body
            return
        if self.command != "GET":
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
            return self._json(405, {"error": f"method {self.command!r} not allowed: GET (UI, API) and POST "
                                             "(ingest, MLflow) only"}, extra={"Allow": "GET, POST"})
        self._json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def do_GET(self) -> None:
        self._safely(self._get)

    def do_POST(self) -> None:
        self._safely(self._post)

    def _safely(self, serve) -> None:
        try:
            serve()
        except Exception:
            log.exception("ui: %s %s failed", self.command, self.path[:200])
            self.close_connection = True
            self._json(500, {"error": "internal error in the server (its log has the details)"})

    def _get(self) -> None:
        url = urlsplit(self.path)
        query = self._query(url)
        if query is None:
            return
        admitted, set_cookie = self._admit(query)
        if not admitted:
            return
        if url.path == "/favicon.ico":  # none: say so without an error in the console
            return self._send(204, b"", "image/x-icon")
        if url.path.startswith(MLFLOW_PREFIXES):
            return self._mlflow(url, b"")
        if url.path.startswith("/api/"):
            return self._api(url.path[len("/api/"):], query)
        return self._static(url.path, set_cookie)

    def _post(self) -> None:
        url = urlsplit(self.path)
        query = self._query(url)
        if query is None or not self._admit(query)[0]:
            self.close_connection = True  # its body is never read
            return
        if url.path not in INGEST_PATHS and not url.path.startswith(MLFLOW_PREFIXES):
            self.close_connection = True
            return self._json(405, {"error": f"{url.path[:200]} is read-only: GET it (POST goes to the ingest and "
                                             "MLflow APIs)"}, extra={"Allow": "GET"})
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype in SIMPLE_TYPES:
            self.close_connection = True
            return self._json(415, {"error": f"a POST needs Content-Type application/json (or the ingest batch type), "
                                             f"not {ctype or 'none'!r}"})
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != (self.headers.get("Host") or ""):
            self.close_connection = True
            return self._json(403, {"error": f"cross-origin POST from {origin[:100]!r} refused"})
        body = self._body()
        if body is None:
            return
        if url.path.startswith(MLFLOW_PREFIXES):
            return self._mlflow(url, body)
        ingest = self.server.ingest
        if ingest is None:
            return self._json(404, {"error": "this server takes no ingest"})
        self._json(*(ingest.batch(body) if url.path == "/ingest/v1/batch" else ingest.read(body)))

    def _query(self, url) -> dict | None:
        try:
            return {k: v[-1] for k, v in parse_qs(url.query, max_num_fields=MAX_QUERY_FIELDS).items()}
        except ValueError:
            self._json(400, {"error": f"too many query parameters (at most {MAX_QUERY_FIELDS})"})
            return None

    def _admit(self, query: dict) -> tuple[bool, str | None]:
        """(allowed, the cookie to set); a refusal is answered here."""
        if not self._host_allowed():
            self._json(403, {"error": "forbidden Host header: without a token the server answers only requests "
                                      "addressed to localhost, 127.0.0.1 or ::1"})
            return False, None
        if self.server.token is None:
            return True, None
        given = (self.headers.get("X-Token") or _bearer(self.headers.get("Authorization")) or query.get("token")
                 or self._cookie())
        if not given or not hmac.compare_digest(given.encode(), self.server.token.encode()):
            self._json(401, {"error": "missing or wrong token: open the URL that `orchestrator server` printed (it "
                                      "carries the token); clients send it as X-Token (ORCHESTRATOR_TOKEN) or "
                                      "Authorization: Bearer (MLFLOW_TRACKING_TOKEN)"})
            return False, None
        if query.get("token"):
            return True, f"{COOKIE}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"
        return True, None

    def _body(self) -> bytes | None:
        """The POST body (Content-Length bytes), or None once an error is answered."""
        self.close_connection = True  # until the body is read whole
        if "Transfer-Encoding" in self.headers:
            self._json(411, {"error": "send the body with a Content-Length (chunked bodies are not taken)"})
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self._json(411, {"error": "a POST needs a Content-Length header"})
            return None
        if length > MAX_BODY:
            self._json(413, {"error": f"body of {length} bytes; at most {MAX_BODY} are taken"})
            return None
        have = self.rfile.read()  # what arrived with the head
        parts, got = [have[:length]], min(len(have), length)
        deadline = time.monotonic() + BODY_TIMEOUT_S
        try:
            while got < length:
                if time.monotonic() > deadline:
                    self._json(408, {"error": f"no whole body within {BODY_TIMEOUT_S:g}s"})
                    return None
                data = self.connection.recv(min(length - got, 1 << 20))
                if not data:
                    return None  # the client went away
                parts.append(data)
                got += len(data)
        except OSError:  # a read timeout, a reset
            return None
        self.after_body = have[length:]
        self.close_connection = False
        return b"".join(parts)

    def _mlflow(self, url, body: bytes) -> None:
        api = self.server.mlflow
        if api is None:
            return self._json(501, {"error_code": "NOT_IMPLEMENTED",
                                    "message": f"the MLflow REST API is not served here: {url.path[:200]}"})
        try:
            query = parse_qs(url.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:
            return self._json(400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "too many query parameters"})
        self._json(*api.handle(self.command, url.path, query, body))

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


def _bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


class UIServer(ConnectionServer):
    def __init__(self, address: tuple[str, int], api: Api, token: str | None, limits: Limits | None = None,
                 ingest: Ingest | None = None, mlflow=None):
        super().__init__(address, limits)
        self.api = api
        self.token = token
        self.ingest = ingest
        self.mlflow = mlflow

    def server_close(self) -> None:
        super().server_close()
        if self.ingest is not None:
            self.ingest.close()  # what was acknowledged is committed already; this ends the writer thread

    def handle(self, sock, addr, head: bytes) -> bytes | None:
        return Handler(sock, addr, self, head).rest


def make_server(*, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                store: Store | None = None, limits: Limits | None = None) -> UIServer:
    """store: the server's writable store (default: --store / ORCHESTRATOR_STORE / ORCHESTRATOR_HOME).
    Ingest writes through it; the UI and the read API open read-only views of it per request; the
    MLflow API gets a connection of its own."""
    if not is_loopback(host) and not token:
        raise UserError(f"refusing to serve on {host} without a token (anyone on the network could read and write "
                        "your runs): add --token")
    if token is not None and not TOKEN_CHARS.fullmatch(token):
        raise UserError("--token must be 8+ characters from A-Z a-z 0-9 - _ . ~ (it travels in a URL and a cookie)")
    store = store or open_store()
    if not hasattr(store, "db"):
        raise UserError(f"the server needs a store of its own (a SQLite path or postgresql://...), not {store.path}")
    api = Api(store)
    ingest = Ingest(store, api.open)
    server = UIServer((host, port), api, token, limits, ingest=ingest, mlflow=_mlflow_api(store))
    return server


def _mlflow_api(store):
    try:
        from orchestrator.ui.mlflow_api import MlflowApi
    except ImportError:  # not in this build: its paths answer 501
        return None
    return MlflowApi(open_store(store.uri))


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


def serve(*, host: str = "127.0.0.1", port: int = 8080, token: str | None = None, store: str | None = None,
          out=print, show_token: bool = True) -> None:
    """`orchestrator server` / `orchestrator ui`: serve until Ctrl-C or SIGTERM. show_token=False
    (a token from the environment, a service whose output a journal keeps): the URL goes without it."""
    opened = open_store(store)
    try:
        server = make_server(host=host, port=port, token=token, store=opened, limits=SERVER_LIMITS)
    except OSError as e:
        opened.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    base = url_of(server, host).split("?")[0].rstrip("/")
    shown = url_of(server, host) if show_token else base + "/"
    if token and show_token:
        access = "token required: open this URL, it carries the token"
    elif token:
        access = "token required: the one in $ORCHESTRATOR_TOKEN (open the URL with ?token=...)"
    else:
        access = "no token: any local user can open it; `orchestrator server --token` requires one"
    out(f"orchestrator server at {shown}  ({access})  store {server.api.path}, Ctrl-C to stop")
    secret = " and ORCHESTRATOR_TOKEN (MLflow: MLFLOW_TRACKING_TOKEN) set to the token" if token else ""
    out(f"runs write here with tracking.uri: {base}, MLflow clients with MLFLOW_TRACKING_URI={base}{secret}")
    if threading.current_thread() is threading.main_thread():  # a service manager's stop: as Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        out("stopped")
    finally:
        server.server_close()
        opened.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
