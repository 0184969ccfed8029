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
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from dermscore import layout, reasons

log = logging.getLogger("dermscore.web")

STATIC = Path(__file__).resolve().parent / "web"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
UPLOAD_PREFIX = f"{layout.INCOMING}web/"
PICTURE_TYPES = {layout.HEATMAP_SUFFIX: "image/png", layout.THUMBNAIL_SUFFIX: "image/jpeg"}
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


def safe_name(name: str) -> str:
    """A file name for the key: the last path part, no control or odd characters, an image suffix."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^\w.\- ()+]", "_", base).strip(" .")[:120] or "image"
    if Path(base).suffix.lower() not in CONTENT_TYPES:
        base += ".jpg"  # the bucket notification only forwards image suffixes; decode judges the content
    return base


class WebApp:
    """State shared by the request handlers: the stack's S3 client, bucket and export folder."""

    def __init__(self, s3: Any, bucket: str, results_dir: Path | None = None) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.results_dir = Path(results_dir) if results_dir else None
        self._lock = threading.Lock()  # the boto3 client is thread-safe; DuckDB connections are made per call

    def upload(self, name: str, data: bytes) -> dict[str, Any]:
        key = f"{UPLOAD_PREFIX}{uuid.uuid4().hex[:12]}/{safe_name(name)}"
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data,
                           ContentType=CONTENT_TYPES.get(Path(key).suffix.lower(), "application/octet-stream"))
        log.info("web upload %s (%d bytes)", key, len(data))
        return {"key": key}

    def result(self, key: str) -> dict[str, Any]:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=layout.image_result_key(key))["Body"].read()
            return {"status": "ok", "result": json.loads(body)}
        except self.s3.exceptions.NoSuchKey:
            pass
        failure = self.failure(key)
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


def handler_class(app: WebApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "dermscore"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per request at debug
            log.debug("%s %s", self.address_string(), fmt % args)

        def send(self, status: int, body: bytes, ctype: str, cache: str = "no-store") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", cache)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy",
                             "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'")
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, status: int, doc: dict[str, Any]) -> None:
            self.send(status, json.dumps(doc, default=str).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path in ("/", "/index.html") or (url.path.startswith("/static/")):
                name = "index.html" if url.path in ("/", "/index.html") else url.path[len("/static/"):]
                path = (STATIC / name).resolve()
                if path.parent != STATIC or path.suffix not in STATIC_TYPES or not path.is_file():
                    return self.send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})
                return self.send(HTTPStatus.OK, path.read_bytes(), STATIC_TYPES[path.suffix])
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
                return self.send(HTTPStatus.OK, found[0], found[1], cache="private, max-age=3600")
            self.send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
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
            data = self.rfile.read(length)
            name = parse_qs(url.query).get("name", ["image.jpg"])[0]
            try:
                self.send_json(HTTPStatus.OK, app.upload(name, data))
            except Exception as exc:  # the bucket refused: tell the page, keep serving
                log.exception("upload failed")
                self.send_json(HTTPStatus.BAD_GATEWAY, {"error": f"upload failed: {type(exc).__name__}"})

    return Handler


def start(app: WebApp, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Serve in a daemon thread; returns the server (``shutdown()`` stops it) and its URL."""
    server = ThreadingHTTPServer((host, port), handler_class(app))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="dermscore-web", daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/"
