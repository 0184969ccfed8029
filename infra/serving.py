"""The real SageMaker PyTorch serving stack on this machine, driven as Batch Transform drives it.

Each *instance* is one model server on an unpacked ``model.tar.gz``: the SageMaker PyTorch
inference toolkit (``sagemaker_pytorch_serving_container.serving.main``, what the image's
entry point runs) starting TorchServe (Java) with the toolkit's handler, which imports
``code/inference.py``. It runs in the serve venv (``.venv-serve``, made by ``make setup``:
the toolkit and TorchServe versions of the image, infra.container), not in the project's venv,
so the archive has to bring what the container lacks itself.

What an instance gets, as in the container:

* the model at ``$SAGEMAKER_BASE_DIR/model`` (``/opt/ml/model`` there; here a folder per
  instance whose ``model`` links to the unpacked archive), the SageMaker Model's environment
  (``TransformModel`` in template.yaml, with ``/opt/ml`` read as that base dir), the image's
  own ``ENV`` (:data:`infra.container.IMAGE_ENV`), and ``SAGEMAKER_BIND_TO_PORT`` (a free port);
* ``/ping`` until Healthy, then ``POST /invocations`` of ``application/jsonlines`` bodies.

What differs, because several instances share one machine here (each has its own machine on
AWS), and is done by a few lines of :data:`LAUNCHER` around the unmodified toolkit:

* the toolkit writes TorchServe's config to ``/etc/sagemaker-ts.properties`` and looks for
  *the* TorchServe process on the machine (it refuses to start beside another): the config goes
  to the instance's folder and the process looked for is the one serving that folder's model
  store; TorchServe's temp folder (its pid file and worker socket) is per instance too;
* TorchServe binds 127.0.0.1 (``TS_*_ADDRESS``; the toolkit's config says 0.0.0.0), and its
  metrics and gRPC ports (8082, 7070, 7071 by default) are free ones;
  ``SAGEMAKER_MODEL_SERVER_WORKERS`` defaults to the job's ``MaxConcurrentTransforms``
  (TorchServe's own default, one worker per CPU core, would load the model that many times on a
  CPU machine; a GPU instance has one worker per GPU);
* AWS credentials and endpoint are the local stack's (``AWS_ENDPOINT_URL``), not a role's;
* a started server is reused by later jobs of the same artifact and environment
  (:class:`ServerPool`); every AWS job starts fresh instances (minutes of start-up).

The launcher makes itself a child subreaper, so TorchServe and its Python workers stay in its
process tree (one tree to measure and to stop), and it stops the server when its stdin closes,
so a server never outlives the process that started it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.container import CONTAINER, IMAGE_ENV

log = logging.getLogger("dermscore.serving")

ROOT = Path(__file__).resolve().parents[1]
SERVE_VENV_ENV = "DERMSCORE_SERVE_VENV"
DEFAULT_SERVE_VENV = ROOT / ".venv-serve"
CONTAINER_BASE_DIR = "/opt/ml"
START_TIMEOUT_S = 300.0
# template.yaml PayloadLimits: TS_MAX_RESPONSE_SIZE = 16 x TS_MAX_REQUEST_SIZE (twice the worst-case ratio
# of an output line to its manifest line: tests/test_serving.py)
RESPONSE_FACTOR = 16
SETUP_HINT = "run `make setup` (it creates .venv-serve and installs Java when missing)"

# Runs in the serve venv: the image's serving entry (serving.main) with the per-instance isolation
# described in the module docstring. Our lines only; the toolkit itself is unmodified.
LAUNCHER = r'''
import ctypes, os, signal, sys, threading, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: TorchServe stays in this tree
import psutil
from sagemaker_pytorch_serving_container import serving, torchserve

def ours():
    return [p for p in psutil.process_iter() if p.status() != psutil.STATUS_ZOMBIE
            and torchserve.TS_NAMESPACE in p.cmdline() and torchserve.MODEL_STORE in p.cmdline()]

def stop_early(signo, frame):  # until the toolkit installs its own handler
    for p in ours():
        p.terminate()
    sys.exit(0)

signal.signal(signal.SIGTERM, stop_early)

def watch_stdin():  # the starting process went away (or closed the pipe): stop
    sys.stdin.read()
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch_stdin, daemon=True).start()

def retrieve_ts_server_process():  # the toolkit's looks for any TorchServe on the machine
    deadline = time.monotonic() + float(os.environ.get("DERMSCORE_TS_START_TIMEOUT", "120"))
    while True:
        found = ours()
        if len(found) == 1:
            return found[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(found)} TorchServe processes for {torchserve.MODEL_STORE}")
        time.sleep(0.2)

torchserve.TS_CONFIG_FILE = os.path.join(os.getcwd(), "sagemaker-ts.properties")  # /etc/ in the image
torchserve._retrieve_ts_server_process = retrieve_ts_server_process
serving.main()
'''

VERSIONS_SCRIPT = r'''
import importlib.metadata as m, json, sys
names = ("sagemaker-pytorch-inference", "torchserve", "torch", "psutil", "pyyaml")
out = {}
for n in names:
    try:
        out[n] = m.version(n)
    except m.PackageNotFoundError:
        out[n] = None
out["python"] = "%d.%d.%d" % sys.version_info[:3]
print(json.dumps(out))
'''


class ServingUnavailable(RuntimeError):
    """The serving stack cannot run here (no serve venv, no Java): says what to do."""


class InvocationFailed(RuntimeError):
    """A request failed after its retries: the transform job fails, as on AWS."""


# --------------------------------------------------------------------------- the serve venv


@dataclass(frozen=True)
class ServeEnv:
    """The serve venv and Java, with their versions (read once)."""

    venv: Path
    java: str
    versions: dict[str, str | None]
    java_version: str

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def describe(self) -> str:
        v = self.versions
        return (f"SageMaker PyTorch inference toolkit {v['sagemaker-pytorch-inference']} + TorchServe "
                f"{v['torchserve']} (Java {self.java_version.split('.')[0]}) on model.tar.gz "
                f"(serve venv: torch {v['torch']}, Python {v['python']})")

    @classmethod
    def locate(cls, venv: str | Path | None = None) -> ServeEnv:
        path = Path(venv or os.environ.get(SERVE_VENV_ENV) or DEFAULT_SERVE_VENV)
        return _locate(str(path.absolute()), os.environ.get("JAVA_HOME", ""), os.environ.get("PATH", ""))


_LOCATED: dict[tuple[str, str, str], ServeEnv] = {}


def _locate(venv: str, java_home: str, path: str) -> ServeEnv:
    key = (venv, java_home, path)
    if key in _LOCATED:
        return _LOCATED[key]
    root = Path(venv)
    python = root / "bin" / "python"
    if not python.exists() or not (root / "bin" / "torchserve").exists():
        raise ServingUnavailable(f"the serving stack's venv {root} is missing or incomplete (no bin/python or "
                                 f"bin/torchserve): {SETUP_HINT}")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java", path=path)
    if not java or not Path(java).exists():
        raise ServingUnavailable(f"TorchServe needs Java 11+ and no `java` is on PATH"
                                 f"{' or in JAVA_HOME' if java_home else ''}: {SETUP_HINT}")
    proc = subprocess.run([str(python), "-c", VERSIONS_SCRIPT], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ServingUnavailable(f"{python} cannot report its packages ({proc.stderr.strip()[-300:]}): {SETUP_HINT}")
    versions = json.loads(proc.stdout)
    wanted = {"sagemaker-pytorch-inference": CONTAINER.toolkit, "torchserve": CONTAINER.torchserve}
    wrong = {n: v for n, v in wanted.items() if versions.get(n) != v}
    if wrong or not versions.get("torch") or not versions.get("psutil"):
        raise ServingUnavailable(f"{root} has {versions}, the serving stack needs {wanted} with torch: {SETUP_HINT}")
    jv = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    m = re.search(r'version "([^"]+)"', jv.stderr + jv.stdout)
    java_version = m.group(1) if m else "unknown"
    major = int(java_version.split(".")[0]) if java_version.split(".")[0].isdigit() else 0
    if major and major < 11:
        raise ServingUnavailable(f"TorchServe needs Java 11+, {java} is {java_version}: {SETUP_HINT}")
    env = ServeEnv(root, java, versions, java_version)
    _LOCATED[key] = env
    return env


# --------------------------------------------------------------------------- processes (/proc)

def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used by ``root``'s process tree: every live process's own time
    plus the time of the children it has reaped (which are gone from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in descendants(root):
        fields = _proc_stat(pid)
        if fields:  # utime stime cutime cstime: fields 14-17 of stat, here 11-14 after the name
            total += sum(int(x) for x in fields[11:15])
    return total / tick


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (held together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------- one instance

def container_environment(model_env: Mapping[str, str], base_dir: Path) -> dict[str, str]:
    """The SageMaker Model's environment with the container's ``/opt/ml`` read as ``base_dir``."""
    def local(value: str) -> str:
        if value == CONTAINER_BASE_DIR or value.startswith(CONTAINER_BASE_DIR + "/"):
            return str(base_dir) + value[len(CONTAINER_BASE_DIR):]
        return value

    return {k: local(str(v)) for k, v in model_env.items()}


class ServerInstance:
    """One "transform instance": the toolkit + TorchServe on one unpacked model, in its own folder."""

    def __init__(self, serve: ServeEnv, model_dir: Path, model_env: Mapping[str, str], folder: Path,
                 workers: int = 1) -> None:
        self.serve = serve
        self.folder = Path(folder)
        self.base_dir = self.folder / "opt_ml"
        self.model_dir = Path(model_dir)
        self.model_env = dict(model_env)
        self.workers = workers
        self.port = 0
        self._side_ports: list[int] = []
        self.proc: subprocess.Popen | None = None
        self.log_path = self.folder / "server.log"
        self.started_s: float | None = None
        self._log_file: Any = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def environment(self) -> dict[str, str]:
        tmp = self.folder / "tmp"
        metrics_port, grpc_inference, grpc_management = self._side_ports
        keep = {k: v for k, v in os.environ.items()
                if k.startswith("AWS_") or k in ("HOME", "USER", "LOGNAME", "TZ", "JAVA_HOME")}
        env = {**keep, **IMAGE_ENV,
               "PATH": f"{self.serve.bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
               **container_environment(self.model_env, self.base_dir),
               "SAGEMAKER_BASE_DIR": str(self.base_dir),
               "SAGEMAKER_BIND_TO_PORT": str(self.port),
               "SAGEMAKER_SAFE_PORT_RANGE": f"{metrics_port}-{metrics_port}",
               "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{self.port}",
               "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{self.port}",
               "TS_METRICS_ADDRESS": f"http://127.0.0.1:{metrics_port}",
               # TorchServe also opens gRPC ports (7070/7071 by default; one server per machine on AWS)
               "TS_GRPC_INFERENCE_ADDRESS": "127.0.0.1", "TS_GRPC_INFERENCE_PORT": str(grpc_inference),
               "TS_GRPC_MANAGEMENT_ADDRESS": "127.0.0.1", "TS_GRPC_MANAGEMENT_PORT": str(grpc_management),
               "TMPDIR": str(tmp), "TEMP": str(tmp)}
        env.setdefault("SAGEMAKER_MODEL_SERVER_WORKERS", str(max(1, self.workers)))
        if self.serve.java and not env.get("JAVA_HOME"):  # the java located, first on PATH
            env["PATH"] = f"{self.serve.bin}{os.pathsep}{Path(self.serve.java).parent}{os.pathsep}" \
                          f"{os.environ.get('PATH', '/usr/bin:/bin')}"
        return env

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ServerInstance:
        t0 = time.monotonic()
        (self.folder / "tmp").mkdir(parents=True, exist_ok=True)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "model"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(self.model_dir, target_is_directory=True)
        self.port, *self._side_ports = free_ports(4)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([str(self.serve.python), "-c", LAUNCHER], cwd=self.folder, env=self.environment(),
                                     stdin=subprocess.PIPE, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.info("serving instance starting: %s on 127.0.0.1:%d (pid %d, log %s)", self.model_dir, self.port,
                 self.proc.pid, self.log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.healthy():
                self.started_s = time.monotonic() - t0
                log.info("serving instance on port %d healthy after %.1f s", self.port, self.started_s)
                return self
            time.sleep(0.25)
        rc = self.proc.poll()
        self.stop()
        why = f"exited with {rc}" if rc is not None else f"not healthy after {timeout_s:.0f} s"
        raise RuntimeError(f"the serving stack did not start ({why}); last lines of {self.log_path}:\n"
                           f"{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            status, body = self.request("GET", "/ping", None, {}, timeout_s=5)
        except OSError:
            return False
        return status == 200 and b"Healthy" in body

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str],
                timeout_s: float) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def invoke(self, body: bytes, content_type: str, accept: str, timeout_s: float, retries: int) -> bytes:
        """``POST /invocations``; a failed attempt (error status, timeout, connection) is retried
        ``retries`` times (ModelClientConfig.InvocationsMaxRetries), then :class:`InvocationFailed`."""
        why = ""
        for attempt in range(retries + 1):
            try:
                status, out = self.request("POST", "/invocations", body,
                                           {"Content-Type": content_type, "Accept": accept}, timeout_s)
                if status == 200:
                    return out
                why = f"HTTP {status}: {out[:300].decode('utf-8', 'replace').strip()}"
            except (OSError, http.client.HTTPException) as exc:  # socket.timeout is an OSError
                why = f"{type(exc).__name__}: {exc}"
            log.warning("invocation of %d bytes failed (attempt %d/%d): %s", len(body), attempt + 1, retries + 1, why)
            if attempt < retries:
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
        raise InvocationFailed(f"model container request of {len(body)} bytes failed after {retries} retries: {why}")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid) if self.proc is not None and self.proc.poll() is None else 0.0

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.healthy()

    def stop(self, timeout_s: float = 30) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            tree = descendants(proc.pid) if proc.poll() is None else []
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the launcher stops TorchServe and exits
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            for pid in tree:  # anything left of the tree (a launcher killed before its handler ran)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


# --------------------------------------------------------------------------- the pool


class ServerPool:
    """Started instances, reused across jobs of the same model artifact and environment.

    On AWS every transform job starts fresh instances; here a second job of the same archive
    (same sha256) and the same environment reuses the running servers, so a test suite or a demo
    pays the start-up (seconds of Java and model loading) once. At most ``max_models`` different
    (artifact, environment) keys keep servers; the least recently used is stopped beyond that.
    Everything stops at interpreter exit.
    """

    def __init__(self, max_models: int = 3) -> None:
        self.max_models = max_models
        self._lock = threading.Lock()
        self._servers: OrderedDict[tuple, list[ServerInstance]] = OrderedDict()
        self._models: dict[str, Path] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None

    def _root(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dermscore-serving-")
        return Path(self._tmp.name)

    def unpacked(self, tarball: Path, digest: str) -> Path:
        """The archive unpacked once per sha256 into the pool's own folder (servers outlive runners)."""
        if digest not in self._models:
            target = self._root() / "models" / digest
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            with tarfile.open(tarball) as tar:
                tar.extractall(target, filter="data")
            self._models[digest] = target
        return self._models[digest]

    def instances(self, serve: ServeEnv, tarball: Path, digest: str, model_env: Mapping[str, str], count: int,
                  workers: int = 1) -> list[ServerInstance]:
        """``count`` healthy instances of this artifact with this environment (started as needed, in parallel)."""
        key = (digest, str(serve.venv), workers, tuple(sorted(model_env.items())))
        with self._lock:
            model_dir = self.unpacked(tarball, digest)
            servers = [s for s in self._servers.pop(key, []) if s.alive()]
            self._servers[key] = servers
            missing = max(0, count - len(servers))
            name = f"{digest[:12]}-{hashlib.sha256(repr(key).encode()).hexdigest()[:8]}"
            folders = [self._root() / "instances" / f"{name}-{uuid.uuid4().hex[:6]}" for _ in range(missing)]
            new = [ServerInstance(serve, model_dir, model_env, f, workers=workers) for f in folders]
            if new:
                with ThreadPoolExecutor(len(new)) as pool:
                    futures = [pool.submit(s.start) for s in new]
                    errors = []
                    for f in futures:
                        try:
                            f.result()
                        except Exception as exc:
                            errors.append(exc)
                    if errors:
                        for s in new:
                            s.stop()
                        raise errors[0]
                servers.extend(new)
            self._evict()
            return servers[:count]

    def _evict(self) -> None:
        while len(self._servers) > self.max_models:
            _, old = self._servers.popitem(last=False)
            for s in old:
                s.stop()

    def running(self) -> list[ServerInstance]:
        with self._lock:
            return [s for servers in self._servers.values() for s in servers]

    def close(self) -> None:
        with self._lock:
            for servers in self._servers.values():
                for s in servers:
                    s.stop()
            self._servers.clear()
            self._models.clear()
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None


SERVERS = ServerPool()
atexit.register(SERVERS.close)
