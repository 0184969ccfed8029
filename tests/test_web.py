"""The upload page of ``dermscore serve``: its API, and a drag and drop in headless Chromium.

``dermscore serve`` runs as a subprocess (the real command: local stack, poller, runner,
export, web page on 127.0.0.1) with a random model whose outputs vary (plumbing only). The
browser test needs Debian's ``chromium`` and ``chromium-driver``: it installs them with
apt-get when they are missing and it can (root), and skips, saying why, only when it cannot.
Its screenshot lands in ``test-artifacts/web-upload.png``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, sample_images

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Flags this machine needs (see the environment notes): no sandbox as root, no background
# network traffic (the network is closed), a fresh profile.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1100")


def http(url: str, data: bytes | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def served(varied_model: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("serve-out")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([sys.executable, "-m", "dermscore.cli", "serve", "--model", str(varied_model),
                             "--out", str(out), "--web-port", "0", "--batching-window", "0.5",
                             "--export-interval", "0.5"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    url = None

    def read() -> None:
        nonlocal url
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("Upload page: "):
                url = line.split()[2]

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 180
    while url is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if url is None:
        proc.kill()
        pytest.fail("dermscore serve did not print its upload page:\n" + "".join(lines[-40:]))
    yield SimpleNamespace(url=url, out=out, proc=proc, lines=lines)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


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
        status, _, body = http(f"{served.url}api/upload?name={urllib.parse.quote('../../' + f.name)}", f.read_bytes())
        assert status == 200
        keys.append(json.loads(body)["key"])
        assert keys[-1].startswith("incoming/web/") and keys[-1].endswith("/" + f.name)  # no path tricks
    status, _, body = http(f"{served.url}api/upload?name=notes.txt", b"not an image at all")
    bad_key = json.loads(body)["key"]
    assert bad_key.endswith("notes.txt.jpg")
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


def test_drag_and_drop_in_headless_chromium(served) -> None:
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
    finally:
        driver.quit()
