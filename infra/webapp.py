"""The upload page of ``dermscore serve``: drop images in a browser, watch their results arrive.

    http://127.0.0.1:<web-port>/        the page (infra/web/: index.html, app.js, style.css)
    POST /api/upload?name=<file name>   raw image bytes -> s3://<bucket>/incoming/web/<id>/<name>
    GET  /api/result?key=<image key>    the per-image JSON document, a failure, or "pending"
    GET  /api/picture?key=<results key> a stored heatmap / thumbnail (results/images/*.png|jpg)

The browser never holds credentials and never talks to S3: this server, bound to 127.0.0.1,
puts the upload into the local (moto) bucket with its own client, so the upload takes the same
path as any other (S3 event -> SQS -> enqueue -> transform -> collect). Results are read back
from the bucket (``results/images/<key>.json``); images refused before scoring have no JSON
document, so their failure rows are looked up in the exported results (``--out``).

Only the page's own origin gets in (docs/results.md, "Upload page"): every request must carry
``Host: 127.0.0.1:<port>`` or ``localhost:<port>`` (else 421: this is what defeats DNS
rebinding), none may carry a foreign ``Origin`` (403), and every POST/PUT/DELETE/PATCH must
carry ``Origin: http://127.0.0.1:<port>`` (or localhost) and the session token that the page
got in its HTML (``X-Dermscore-Token``; else 403). Sockets time out after ``timeout_s``, at
most ``max_connections`` are served at once (more get 503), and every response says
``no-store`` and forbids framing and sniffing.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import secrets
import socket
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from dermscore import layout, reasons, results

log = logging.getLogger("dermscore.web")

STATIC = Path(__file__).resolve().parent / "web"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
UPLOAD_PREFIX = f"{layout.INCOMING}web/"
PICTURE_TYPES = {layout.HEATMAP_SUFFIX: "image/png", layout.THUMBNAIL_SUFFIX: "image/jpeg"}
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
TOKEN_HEADER = "X-Dermscore-Token"
TOKEN_PLACEHOLDER = b"__DERMSCORE_TOKEN__"  # in index.html: <meta name="dermscore-token" content="...">
STATE_CHANGING = ("POST", "PUT", "DELETE", "PATCH")
TIMEOUT_S = 10.0  # a client that stalls this long on one read or write is dropped
MAX_CONNECTIONS = 16  # served at once; more get 503 (a browser opens at most 6 per host)
DISCARD_LIMIT = 1024 * 1024  # a refused request's body is read and dropped up to this size
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cross-Origin-Resource-Policy": "same-origin",
                    "Cache-Control": "no-store"}


def safe_name(name: str) -> str:
    """A file name for the key: the last path part, no control or odd characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^\w.\- ()+]", "_", base).strip(" .")[:120] or "image"
    return base  # any name: the bucket forwards every object under incoming/, decode judges the content


class WebApp:
    """State shared by the request handlers: the stack's S3 client, bucket and export folder."""

    def __init__(self, s3: Any, bucket: str, results_dir: Path | None = None) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.results_dir = Path(results_dir) if results_dir else None
        self._lock = threading.Lock()  # the boto3 client is thread-safe; DuckDB connections are made per call
        self.token = secrets.token_urlsafe(32)  # this session's; the page gets it in its HTML

    def upload(self, name: str, data: bytes) -> dict[str, Any]:
        key = f"{UPLOAD_PREFIX}{uuid.uuid4().hex[:12]}/{safe_name(name)}"
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data,
                           ContentType=CONTENT_TYPES.get(Path(key).suffix.lower(), "application/octet-stream"))
        log.info("web upload %s (%d bytes)", key, len(data))
        return {"key": key}

    def result(self, key: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.s3.get_object(Bucket=self.bucket, Key=layout.image_result_key(key))["Body"].read())
            if doc.get("status") != results.FAILED:
                return {"status": "ok", "result": doc}
            return {"status": "failed", **{k: doc.get(k) for k in ("reason", "detail", "stage")}}
        except self.s3.exceptions.NoSuchKey:
            pass
        failure = self.failure(key)   # refused before the transform: a failure row only
        if failure:
            return {"status": "failed", **failure}
        return {"status": "pending"}

    def failure(self, key: str) -> dict[str, str] | None:
        if self.results_dir is None or not (self.results_dir / "failures").is_dir():
            return None
        from analytics.query import connect

        con = connect(self.results_dir)
        try:
            row = con.execute("SELECT reason, detail, stage FROM failures WHERE image_key = ? "
                              "ORDER BY failed_at DESC LIMIT 1", [key]).fetchone()
        finally:
            con.close()
        return {"reason": row[0], "detail": row[1], "stage": row[2]} if row else None

    def picture(self, key: str) -> tuple[bytes, str] | None:
        ctype = next((t for s, t in PICTURE_TYPES.items() if key.endswith(s)), None)
        if ctype is None or not key.startswith(layout.IMAGES) or ".." in key:
            return None  # only the pipeline's own derived pictures, never the uploads
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read(), ctype
        except self.s3.exceptions.NoSuchKey:
            return None


def handler_class(app: WebApp, timeout_s: float = TIMEOUT_S) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "dermscore"
        timeout = timeout_s  # socket timeout: a client that sends less than its Content-Length is dropped

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per request at debug
            log.debug("%s %s", self.address_string(), fmt % args)

        def send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, status: int, doc: dict[str, Any]) -> None:
            self.send(status, json.dumps(doc, default=str).encode(), "application/json")

        # ---- who may ask --------------------------------------------------------------------
        def own_names(self) -> set[str]:
            port = self.server.server_address[1]
            return {f"127.0.0.1:{port}", f"localhost:{port}"} | ({"127.0.0.1", "localhost"} if port == 80 else set())

        def refuse(self, status: int, error: str) -> None:
            log.warning("web refused %s %s from %s: %s (Host %s, Origin %s)", self.command, self.path.split("?")[0],
                        self.client_address[0], error, self.headers.get("Host"), self.headers.get("Origin"))
            self.discard_body()
            self.close_connection = True
            self.send_json(status, {"error": error})

        def discard_body(self) -> None:
            """Read a refused request's (small) body, so closing the socket does not reset the reply."""
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                return
            if 0 < length <= DISCARD_LIMIT:
                self.rfile.read(length)

        def allowed(self) -> bool:
            """Host on every request, a foreign Origin on none, and on state-changing ones our own Origin
            and the session token. False: refused (and answered)."""
            if (self.headers.get("Host") or "").lower() not in self.own_names():
                self.refuse(HTTPStatus.MISDIRECTED_REQUEST, "unknown Host: this page answers only to its own address")
                return False
            origin = self.headers.get("Origin")
            own_origin = origin is not None and origin.lower() in {f"http://{name}" for name in self.own_names()}
            if origin is not None and not own_origin:
                self.refuse(HTTPStatus.FORBIDDEN, "foreign Origin")
                return False
            if self.command not in STATE_CHANGING:
                return True
            if not own_origin:
                self.refuse(HTTPStatus.FORBIDDEN, "missing Origin")
                return False
            token = self.headers.get(TOKEN_HEADER) or ""
            if not hmac.compare_digest(token.encode(), app.token.encode()):
                self.refuse(HTTPStatus.FORBIDDEN, "missing or wrong session token: reload the page")
                return False
            return True

        # ---- the routes ---------------------------------------------------------------------
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if not self.allowed():
                return
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path in ("/", "/index.html") or (url.path.startswith("/static/")):
                name = "index.html" if url.path in ("/", "/index.html") else url.path[len("/static/"):]
                path = (STATIC / name).resolve()
                if path.parent != STATIC or path.suffix not in STATIC_TYPES or not path.is_file():
                    return self.send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})
                body = path.read_bytes()
                if path.suffix == ".html":
                    body = body.replace(TOKEN_PLACEHOLDER, app.token.encode())  # url-safe: no HTML escaping needed
                return self.send(HTTPStatus.OK, body, STATIC_TYPES[path.suffix])
            if url.path == "/api/meta":
                from dermscore.labels import CLASS_NAMES, CLASSES, MALIGNANT

                return self.send_json(HTTPStatus.OK, {"classes": list(CLASSES), "names": CLASS_NAMES,
                                                      "malignant": list(MALIGNANT)})
            if url.path == "/api/result" and q.get("key"):
                return self.send_json(HTTPStatus.OK, app.result(q["key"]))
            if url.path == "/api/picture" and q.get("key"):
                found = app.picture(q["key"])
                if found is None:
                    return self.send_json(HTTPStatus.NOT_FOUND, {"error": "no such picture"})
                return self.send(HTTPStatus.OK, found[0], found[1])
            self.send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def not_allowed(self) -> None:
            if self.allowed():  # checked like any request (a foreign one is told so), then 405
                self.send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "GET or POST only"})

        do_OPTIONS = do_PUT = do_DELETE = do_PATCH = not_allowed  # no CORS preflight is ever granted

        def do_POST(self) -> None:  # noqa: N802
            if not self.allowed():
                return
            url = urlparse(self.path)
            if url.path != "/api/upload":
                return self.send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            try:
                length = int(self.headers.get("Content-Length", "-1"))
            except ValueError:
                length = -1
            if length < 0:
                return self.send_json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            if length > reasons.MAX_BYTES:
                return self.send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                      {"error": f"larger than {reasons.MAX_BYTES // (1024 * 1024)} MB"})
            data = self.rfile.read(length)  # a stalled client times out here (handle_one_request drops it)
            if len(data) < length:
                self.close_connection = True
                return self.send_json(HTTPStatus.BAD_REQUEST, {"error": "body shorter than Content-Length"})
            name = parse_qs(url.query).get("name", ["image.jpg"])[0]
            try:
                self.send_json(HTTPStatus.OK, app.upload(name, data))
            except Exception as exc:  # the bucket refused: tell the page, keep serving
                log.exception("upload failed")
                self.send_json(HTTPStatus.BAD_GATEWAY, {"error": f"upload failed: {type(exc).__name__}"})

    return Handler


class LocalServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once: the next ones get 503 and are closed."""

    daemon_threads = True
    BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
            b"Retry-After: 1\r\nConnection: close\r\n\r\nbusy\n")

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):  # refused on the accepting thread: a short write, then close
            log.warning("web: connection from %s refused: all %s slots busy", client_address[0], "connection")
            try:
                request.settimeout(1)
                request.sendall(self.BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(app: WebApp, host: str = "127.0.0.1", port: int = 0, timeout_s: float = TIMEOUT_S,
                max_connections: int = MAX_CONNECTIONS) -> LocalServer:
    """The page's server, bound but not serving yet. Loopback only: the token is its only login."""
    if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        raise ValueError(f"the upload page serves this machine only: bind it to loopback, not {host}")
    return LocalServer((host, port), handler_class(app, timeout_s), max_connections)


def start(app: WebApp, host: str = "127.0.0.1", port: int = 0, timeout_s: float = TIMEOUT_S,
          max_connections: int = MAX_CONNECTIONS) -> tuple[ThreadingHTTPServer, str]:
    """Serve in a daemon thread; returns the server (``shutdown()`` stops it) and its URL."""
    server = make_server(app, host, port, timeout_s, max_connections)
    threading.Thread(target=server.serve_forever, name="dermscore-web", daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/"
