"""The local stack's moto server: moto in server mode on 127.0.0.1, for this machine's own clients.

boto3, the aws CLI and the handlers reach it over HTTP as they would reach AWS. Two WSGI layers
sit in front of moto's app: :class:`LoopbackOnly` (no other machine and no web page may talk to
it) and, for ``dermscore serve``, :class:`infra.spool.Spooling` (what it acknowledged under
``incoming/`` is on disk first, so it survives a crash of the stack).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import Any

from infra.spool import Spool, Spooling

log = logging.getLogger("dermscore.stack")

LOOPBACK = "127.0.0.1"


class LoopbackOnly:
    """WSGI middleware in front of moto: only this machine's own, non-browser clients get through.

    moto's Flask app answers every ``Origin`` with ``Access-Control-Allow-Origin`` (flask-cors),
    so without this any web page the user visits could read and change the local stack. Refused:
    a peer that is not loopback, a ``Host`` that is not this server (DNS rebinding: 421), a
    foreign ``Origin`` or a cross-site ``Sec-Fetch-Site`` (403), and moto's own ``/moto-api/``
    (reset, dashboard, seed, ...) for any request that carries either header. boto3 and the aws
    CLI send neither header, so they are unaffected.
    """

    def __init__(self, app: Any, host: str = LOOPBACK) -> None:
        self.app = app
        self.host = f"[{host}]" if ":" in host else host  # as it appears in a URL / Host header
        self.port = 0  # set once the socket is bound

    def refusal(self, environ: dict[str, Any]) -> tuple[str, str] | None:
        try:
            local_peer = ipaddress.ip_address(environ.get("REMOTE_ADDR", "")).is_loopback
        except ValueError:
            local_peer = False
        host = environ.get("HTTP_HOST", "").lower()
        own = {f"{h}:{self.port}" for h in (self.host, LOOPBACK, "localhost")}
        origin, site = environ.get("HTTP_ORIGIN"), environ.get("HTTP_SEC_FETCH_SITE")
        if not local_peer:
            return "403 Forbidden", "loopback clients only"
        if host not in own and not host.endswith(f".localhost:{self.port}"):  # *.localhost: S3 virtual hosts
            return "421 Misdirected Request", "unknown Host"
        if environ.get("PATH_INFO", "").startswith("/moto-api") and (origin is not None or site is not None):
            return "403 Forbidden", "moto-api refuses browsers"
        if origin is not None and origin.lower() not in {f"http://{h}" for h in own}:
            return "403 Forbidden", "foreign Origin"
        if site not in (None, "same-origin", "none"):
            return "403 Forbidden", "cross-site request"
        return None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        refused = self.refusal(environ)
        if refused is None:
            return self.app(environ, start_response)
        status, text = refused
        body = f"{text}\n".encode()
        log.warning("local stack refused %s %s: %s (Origin %s, Host %s)", environ.get("REQUEST_METHOD"),
                    environ.get("PATH_INFO"), text, environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST"))
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [body]


class LocalMotoServer:
    """moto's server (the app of ``ThreadedMotoServer``) behind :class:`LoopbackOnly`, in a daemon thread."""

    def __init__(self, host: str, port: int, spool: Spool | None = None) -> None:
        self.host, self.port, self.spool = host, port, spool
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        moto: Any = DomainDispatcherApplication(create_backend_app)
        app = LoopbackOnly(moto if self.spool is None else Spooling(moto, self.spool), self.host)
        self._server = make_server(self.host, self.port, app, threaded=True, request_handler=MotoRequestHandler)
        app.port = self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="dermscore-moto", daemon=True)
        self._thread.start()

    def get_host_and_port(self) -> tuple[str, int]:
        return self.host, self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def start_server(port: int = 0, *, host: str = LOOPBACK, spool: Spool | None = None) -> tuple[LocalMotoServer, str]:
    """Start moto in server mode on 127.0.0.1 (0 = any free port); returns (server, endpoint URL).

    The server has no authentication, so it binds to a loopback address only: ``host`` must be
    given explicitly to change it, and anything but loopback is refused. With ``spool``, what it
    acknowledges under ``incoming/`` is on disk first (:mod:`infra.spool`).
    """
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the local stack has no authentication: bind it to loopback, not {host}")
    server = LocalMotoServer(host, port, spool)
    server.start()
    bound, real_port = server.get_host_and_port()
    return server, f"http://{f'[{bound}]' if ':' in bound else bound}:{real_port}"
