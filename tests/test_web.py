"""The upload page of ``dermscore serve``: its API, and a drag and drop in headless Chromium.

``dermscore serve`` runs as a subprocess (the real command: local stack, poller, runner,
export, web page on 127.0.0.1) with a random model whose outputs vary (plumbing only). The
browser test needs Debian's ``chromium`` and ``chromium-driver``: it installs them with
apt-get when they are missing and it can (root), and skips, saying why, only when it cannot.
Its screenshot lands in ``test-artifacts/web-upload.png``.

The guards (in-process servers on the session's moto server): the page answers only to its own
Host, uploads need its own Origin and the session token, stalled clients are dropped, the
connection cap holds, and the moto endpoint refuses browsers from other origins.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection, HTTPException
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, Served, sample_images

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Flags this machine needs (see the environment notes): no sandbox as root, no background
# network traffic (the network is closed), a fresh profile.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1100")


def http(url: str, data: bytes | None = None, timeout: float = 30,
         headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def served(varied_model: Path, tmp_path_factory: pytest.TempPathFactory):
    # Heatmaps for high-risk images (the page shows them): the local knob over HeatmapMode.
    serve = Served(varied_model, tmp_path_factory.mktemp("serve-out"), "--web-port", "0", "--batching-window", "0.5",
                   "--export-interval", "0.5", env={"DERMSCORE_GRADCAM": "high"})
    url = next((ln.split()[2] for ln in serve.lines if ln.startswith("Upload page: ")), None)
    if url is None:
        serve.proc.kill()
        pytest.fail("dermscore serve did not print its upload page:\n" + "".join(serve.lines[-40:]))
    serve.url, serve.headers = url, upload_headers(url)
    yield serve
    serve.stop()


def upload_headers(url: str) -> dict[str, str]:
    """What the page's own script sends with an upload: its Origin and the token from its HTML."""
    status, _, page = http(url)
    assert status == 200
    token = re.search(rb'<meta name="dermscore-token" content="([\w-]+)">', page)
    assert token and len(token.group(1)) >= 32, page[:400]
    return {"Origin": url.rstrip("/"), "X-Dermscore-Token": token.group(1).decode()}


def served_s3(served):
    return served.s3()


def web_keys(s3, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="incoming/web/").get("Contents", [])]


def wait_result(url: str, key: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, body = http(f"{url}api/result?key={urllib.parse.quote(key)}")
        doc = json.loads(body)
        if status == 200 and doc["status"] != "pending":
            return doc
        time.sleep(0.5)
    raise AssertionError(f"no result for {key} in {timeout}s")


def test_upload_api_scores_and_reports_failures(served) -> None:
    status, headers, page = http(served.url)
    assert status == 200 and b'id="drop"' in page and "script-src 'self'" in headers["Content-Security-Policy"]
    assert b"AWS_" not in page and b"secret" not in page.lower()
    files = sample_images(2)
    keys = []
    for f in files:
        status, _, body = http(f"{served.url}api/upload?name={urllib.parse.quote('../../' + f.name)}", f.read_bytes(),
                               headers=served.headers)
        assert status == 200
        keys.append(json.loads(body)["key"])
        assert keys[-1].startswith("incoming/web/") and keys[-1].endswith("/" + f.name)  # no path tricks
    status, _, body = http(f"{served.url}api/upload?name=notes.txt", b"not an image at all", headers=served.headers)
    bad_key = json.loads(body)["key"]
    assert bad_key.endswith("/notes.txt")      # kept as named: the content decides (not_an_image)
    for key in keys:
        doc = wait_result(served.url, key)
        assert doc["status"] == "ok" and doc["result"]["image_key"] == key
        classes = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
        assert abs(sum(doc["result"][f"prob_{c}"] for c in classes) - 1) < 1e-4
        if doc["result"]["heatmap_key"]:
            heatmap = urllib.parse.quote(doc["result"]["heatmap_key"])
            status, headers, png = http(f"{served.url}api/picture?key={heatmap}")
            assert status == 200 and headers["Content-Type"] == "image/png" and png[:4] == b"\x89PNG"
    failed = wait_result(served.url, bad_key)
    assert failed["status"] == "failed" and failed["reason"] == "not_an_image"
    # the picture endpoint serves derived pictures only, never uploads
    assert http(f"{served.url}api/picture?key={urllib.parse.quote(keys[0])}")[0] == 404
    assert http(f"{served.url}api/picture?key=results/images/../../{keys[0]}.heatmap.png")[0] == 404
    assert http(f"{served.url}static/../../pyproject.toml")[0] == 404


def ensure_chromium() -> None:
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs Debian packages chromium + chromium-driver (not installed; apt-get needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"could not install chromium/chromium-driver: {' '.join(cmd)}: {r.stderr[-500:]}")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("apt-get ran but chromium/chromedriver are still missing")


EVIL_PAGE = """<!doctype html><html><body><script>
// Another origin (another port on 127.0.0.1) tries the upload page and the moto endpoint.
const [page, moto, bucket] = [__PAGE__, __MOTO__, __BUCKET__];
const out = {};
async function attempt(name, url, init) {
  try { const r = await fetch(url, init); out[name] = `${r.type}:${r.status}`; }
  catch (e) { out[name] = `error:${e.name}`; }
}
(async () => {
  await attempt("simple-upload", page + "api/upload?name=evil-simple.jpg",
                { method: "POST", mode: "no-cors", body: "x" });
  await attempt("cors-upload", page + "api/upload?name=evil-cors.jpg",
                { method: "POST", body: "x", headers: { "X-Dermscore-Token": "guessed" } });
  await attempt("read-meta", page + "api/meta", {});
  await attempt("read-page", page, {});
  await attempt("moto-reset", moto + "/moto-api/reset", { method: "POST", mode: "no-cors" });
  await attempt("moto-put", `${moto}/${bucket}/incoming/evil-moto.jpg`, { method: "PUT", body: "x" });
  await attempt("moto-list", `${moto}/${bucket}?list-type=2`, {});
  document.body.dataset.results = JSON.stringify(out);
  document.body.dataset.done = "1";
})();
</script></body></html>
"""


def cross_origin_attempts(driver, served, folder: Path) -> dict[str, str]:
    """Serve EVIL_PAGE from another 127.0.0.1 port, open it in the browser, return what its fetches saw."""
    from functools import partial

    page = EVIL_PAGE
    for name, value in (("__PAGE__", served.url), ("__MOTO__", served.endpoint), ("__BUCKET__", served.bucket)):
        page = page.replace(name, json.dumps(value))
    (folder / "evil.html").write_text(page)
    evil = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(folder)))
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        driver.get(f"http://127.0.0.1:{evil.server_address[1]}/evil.html")
        deadline = time.monotonic() + 30
        while driver.execute_script("return document.body.dataset.done") != "1":
            assert time.monotonic() < deadline, "the other origin's page did not finish"
            time.sleep(0.2)
        return json.loads(driver.execute_script("return document.body.dataset.results"))
    finally:
        evil.shutdown()
        evil.server_close()


DROP_JS = """
const [items, done] = [arguments[0], arguments[arguments.length - 1]];
const dt = new DataTransfer();
for (const [name, b64, type] of items) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  dt.items.add(new File([bytes], name, { type }));
}
const zone = document.getElementById("drop");
for (const t of ["dragenter", "dragover", "drop"]) {
  zone.dispatchEvent(new DragEvent(t, { bubbles: true, cancelable: true, dataTransfer: dt }));
}
done(document.querySelectorAll("#results .card").length);
"""


def test_drag_and_drop_in_headless_chromium(served, tmp_path: Path) -> None:
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={served.out / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_script_timeout(30)
        driver.get(served.url)
        deadline = time.monotonic() + 30
        while driver.execute_script("return document.body.dataset.ready") != "1":
            assert time.monotonic() < deadline, "page did not initialise"
            time.sleep(0.2)
        files = sample_images(4)
        items = [[f.name, base64.b64encode(f.read_bytes()).decode(), "image/jpeg"] for f in files]
        items.append(["holiday-notes.png", base64.b64encode(b"this is not a picture").decode(), "image/png"])
        assert driver.execute_async_script(DROP_JS, items) == len(items)
        deadline = time.monotonic() + 240
        states: list = []
        while time.monotonic() < deadline:
            states = driver.execute_script(
                "return [...document.querySelectorAll('#results .card')].map(c => [c.dataset.name, c.dataset.state])")
            if all(s != "pending" for _, s in states):
                break
            time.sleep(1)
        assert dict(states) == {**{f.name: "scored" for f in files}, "holiday-notes.png": "failed"}, states
        cards = driver.execute_script("""
            return [...document.querySelectorAll('#results .card')].map(c => ({
              name: c.dataset.name, cls: c.className, rows: c.querySelectorAll('table.probs tr').length,
              imgs: [...c.querySelectorAll('img')].map(i => [i.alt, i.complete && i.naturalWidth > 0]),
              text: c.innerText}))""")
        by_name = {c["name"]: c for c in cards}
        for f in files:
            c = by_name[f.name]
            assert c["rows"] == 7 and "%" in c["text"] and all(ok for _, ok in c["imgs"]), c
            assert ("Grad-CAM heatmap" in [a for a, _ in c["imgs"]]) == ("risk-high" in c["cls"]), c
        assert any("risk-high" in by_name[f.name]["cls"] for f in files)
        assert "not_an_image" in by_name["holiday-notes.png"]["text"]
        assert "4 scored" in driver.find_element("id", "summary").text
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "web-upload.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] if hasattr(driver, "get_log") else []
        assert not [e for e in logs if "favicon" not in e["message"]], logs

        # a page from another origin gets nothing in: no upload, no read, no moto reset
        s3 = served_s3(served)
        before = web_keys(s3, served.bucket)
        assert len(before) >= len(items)  # this test's own uploads (with the token) are there
        seen = cross_origin_attempts(driver, served, tmp_path)
        assert len(seen) == 7 and all(v.startswith("error:") or v == "opaque:0" for v in seen.values()), seen
        for name in ("cors-upload", "read-meta", "read-page", "moto-put", "moto-list"):
            assert seen[name].startswith("error:"), seen  # refused preflight / no CORS headers: unreadable
        assert web_keys(s3, served.bucket) == before  # the bucket survived (no reset) and got no new object
        assert not [k for k in s3.list_objects_v2(Bucket=served.bucket).get("Contents", []) if "evil" in k["Key"]]
        # the no-cors ones (no preflight) were sent, and refused by the servers: serve's log file says so
        log = (served.out / "dermscore.log").read_text()
        assert "web refused POST /api/upload" in log and "local stack refused POST /moto-api/reset" in log, seen
    finally:
        driver.quit()


# --------------------------------------------------------------------------- the page's guards

@pytest.fixture()
def page(make_stack):
    """Factory: an upload page (in this process) on a fresh stack of the session's moto server."""
    from infra import webapp

    started = []

    def make(**kwargs):
        stack = make_stack()
        s3 = stack.client("s3")
        server, url = webapp.start(webapp.WebApp(s3, stack.bucket), **kwargs)
        started.append(server)
        port = server.server_address[1]
        return SimpleNamespace(url=url, port=port, s3=s3, bucket=stack.bucket, own=f"http://127.0.0.1:{port}",
                               token=upload_headers(url)["X-Dermscore-Token"])

    yield make
    for server in started:
        server.shutdown()
        server.server_close()


def raw(port: int, method: str, path: str, headers: dict[str, str],
        body: bytes | None = None) -> tuple[int, dict, bytes]:
    """One request to 127.0.0.1:port with exactly these headers (no Host unless given)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in {**headers, **({"Content-Length": str(len(body))} if body is not None else {})}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_page_answers_only_its_own_host_and_sends_its_headers(page) -> None:
    p = page()
    for path in ("/", "/api/meta", "/static/app.js", "/api/result?key=incoming/x.jpg"):
        status, _, body = raw(p.port, "GET", path, {"Host": f"evil.example:{p.port}"})
        assert status == 421 and len(body) < 200 and p.token.encode() not in body, (path, status, body)
    assert raw(p.port, "GET", "/", {"Host": "127.0.0.1:1"})[0] == 421  # right name, another port
    assert raw(p.port, "GET", "/", {})[0] == 421  # no Host at all
    for host in (f"127.0.0.1:{p.port}", f"localhost:{p.port}", f"LOCALHOST:{p.port}"):
        status, headers, body = raw(p.port, "GET", "/", {"Host": host})
        assert status == 200 and f'content="{p.token}"'.encode() in body and b"__DERMSCORE_TOKEN__" not in body
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "default-src 'self'" in csp
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer" and headers["Cache-Control"] == "no-store"
    status, headers, _ = raw(p.port, "GET", "/api/meta", {"Host": f"127.0.0.1:{p.port}"})
    assert status == 200 and headers["Cache-Control"] == "no-store" and "Access-Control-Allow-Origin" not in headers
    assert raw(p.port, "GET", "/api/meta", {"Host": f"127.0.0.1:{p.port}", "Origin": "http://evil.example"})[0] == 403
    assert page().token != p.token  # one token per server


def test_uploads_need_own_origin_and_session_token(page) -> None:
    p = page()
    host = {"Host": f"127.0.0.1:{p.port}"}
    good = {**host, "Origin": p.own, "X-Dermscore-Token": p.token}
    refused = {
        "no Origin": {**host, "X-Dermscore-Token": p.token},
        "foreign Origin": {**good, "Origin": "http://evil.example"},
        "other local port": {**good, "Origin": "http://127.0.0.1:1"},
        "null Origin": {**good, "Origin": "null"},
        "no token": {**host, "Origin": p.own},
        "wrong token": {**good, "X-Dermscore-Token": p.token[:-2] + "xx"},
        "empty token": {**good, "X-Dermscore-Token": ""},
    }
    for why, headers in refused.items():
        status, _, body = raw(p.port, "POST", "/api/upload?name=x.jpg", headers, b"\xff\xd8 not much")
        assert status == 403 and json.loads(body)["error"], (why, status, body)
    assert raw(p.port, "POST", "/api/upload?name=x.jpg", {**good, "Host": f"evil.example:{p.port}"}, b"x")[0] == 421
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        assert raw(p.port, method, "/api/upload", {**host, "Origin": "http://evil.example"})[0] == 403, method
        assert raw(p.port, method, "/api/upload", good)[0] == 405, method
    assert web_keys(p.s3, p.bucket) == []  # nothing refused reached the bucket
    for origin in (p.own, f"http://localhost:{p.port}"):
        status, _, body = raw(p.port, "POST", "/api/upload?name=ok.jpg", {**good, "Origin": origin}, b"\xff\xd8 bytes")
        assert status == 200, body
    assert len(web_keys(p.s3, p.bucket)) == 2


def test_stalled_client_is_dropped_and_does_not_block_others(page) -> None:
    p = page(timeout_s=1)
    stalled = socket.create_connection(("127.0.0.1", p.port), timeout=15)
    try:
        stalled.sendall(f"POST /api/upload?name=s.jpg HTTP/1.1\r\nHost: 127.0.0.1:{p.port}\r\nOrigin: {p.own}\r\n"
                        f"X-Dermscore-Token: {p.token}\r\nContent-Length: 1000\r\n\r\n".encode() + b"0123456789")
        status, _, body = raw(p.port, "GET", "/api/meta", {"Host": f"127.0.0.1:{p.port}"})  # served meanwhile
        assert status == 200 and "classes" in json.loads(body)
        started = time.monotonic()
        assert stalled.recv(4096) == b""  # the server closed it: no reply, no upload
        assert time.monotonic() - started < 10
    finally:
        stalled.close()
    assert web_keys(p.s3, p.bucket) == []


def test_connection_cap_refuses_extra_connections(page) -> None:
    p = page(max_connections=2, timeout_s=30)
    holders = [socket.create_connection(("127.0.0.1", p.port), timeout=60) for _ in range(2)]
    try:
        for h in holders:
            h.sendall(b"GET /api/meta HTTP/1.1\r\n")  # an unfinished request holds a slot (for up to 30 s)
        extra = socket.create_connection(("127.0.0.1", p.port), timeout=60)  # accepted after both (FIFO)
        try:
            reply = extra.recv(4096)  # without the cap: no reply until the handler's 30 s timeout, then b""
            assert reply.startswith(b"HTTP/1.0 503"), reply
        finally:
            extra.close()
    finally:
        for h in holders:
            h.close()
    deadline = time.monotonic() + 30  # the slots come back once the holders are gone
    status = None
    while status != 200 and time.monotonic() < deadline:
        try:
            status = raw(p.port, "GET", "/api/meta", {"Host": f"127.0.0.1:{p.port}"})[0]
        except (OSError, HTTPException):  # a 503 answered before the request was read may come as a reset
            status = None
        if status != 200:
            time.sleep(0.1)
    assert status == 200


# --------------------------------------------------------------------------- the moto endpoint

def test_moto_refuses_other_origins_and_keeps_serving_boto3(make_stack, moto_endpoint: str) -> None:
    from infra.motoserver import start_server

    stack = make_stack()
    s3 = stack.client("s3")
    s3.put_object(Bucket=stack.bucket, Key="incoming/a.jpg", Body=b"x")
    port = int(moto_endpoint.rsplit(":", 1)[1])
    own = {"Host": f"127.0.0.1:{port}"}
    evil = {**own, "Origin": "http://evil.example"}
    preflight = {**evil, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,x-amz-target"}
    for method, path, headers in (("GET", f"/{stack.bucket}/incoming/a.jpg", evil),
                                  ("GET", "/", evil),
                                  ("OPTIONS", "/", preflight),
                                  ("POST", "/", {**evil, "Content-Type": "application/x-www-form-urlencoded"}),
                                  ("GET", f"/{stack.bucket}/incoming/a.jpg", {**own, "Sec-Fetch-Site": "cross-site"}),
                                  ("POST", "/moto-api/reset", evil),
                                  ("POST", "/moto-api/reset", {**own, "Origin": f"http://127.0.0.1:{port}"}),
                                  ("POST", "/moto-api/reset", {**own, "Sec-Fetch-Site": "same-origin"}),
                                  ("GET", "/moto-api/data.json", evil)):
        status, headers_back, body = raw(port, method, path, headers, b"" if method == "POST" else None)
        assert status == 403, (method, path, headers, status, body[:200])
        assert not any(k.lower().startswith("access-control-") for k in headers_back), headers_back
    status, _, body = raw(port, "GET", f"/{stack.bucket}/incoming/a.jpg", {"Host": f"evil.example:{port}"})
    assert status == 421, body  # DNS rebinding: a foreign name for this address
    # nothing was reset, and boto3 (no Origin) works as before
    assert s3.get_object(Bucket=stack.bucket, Key="incoming/a.jpg")["Body"].read() == b"x"
    assert stack.queue_depth()["visible"] >= 0
    with pytest.raises(ValueError, match="loopback"):
        start_server(host="0.0.0.0")
