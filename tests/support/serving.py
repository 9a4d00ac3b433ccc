"""A service as deployed, on loopback: gunicorn on a Unix socket behind nginx with the
configuration `luksctl-api proxy-config` (or `luksctl-api-wn proxy-config`) writes.

Used by the proxy's tests (tests/unit/test_proxy.py, tests/contract/test_schemathesis.py's
proxied runs), luksctl-client's tests and scripts/bench_status.py and bench_client.py. One nginx per listen port: start_nginx as often as ports are
needed, each in front of any socket (one that does not exist gives nginx's own 502).

The directory must be reachable by nginx's workers, which are not root: not under pytest's
base directory (root's only, 0700).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .net import free_port
from .raw_http import ALLOWED, ALSO_ALLOWED
from .waiting import wait_until

NGINX = "/usr/sbin/nginx"
# nginx's workers drop to this user here; in a deployment to luksctl_proxy (both have a group of
# the same name, as nginx's `user` directive needs).
PROXY_USER = "daemon"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def installed(command: str) -> str:
    """A console script of this package, from the environment that runs us."""
    return str(Path(sys.executable).with_name(command))


def gunicorn_argv(app: str, socket_path: Path, *options: str) -> list[str]:
    """gunicorn with the deployed settings (deploy/gunicorn.conf.py) on `socket_path`; `options`
    come after the file's and win over it, as the units' do."""
    return [installed("gunicorn"), "--config", str(DEPLOY / "gunicorn.conf.py"), *options, "--bind", f"unix:{socket_path}", app]


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Serving:
    """The processes of one served stack, each with its log in `directory`, stopped together.

    `config` is the service's config.json: gunicorn's app and proxy-config both read it.
    `admin` is the service's admin command (luksctl-api or luksctl-api-wn).
    """

    def __init__(self, directory: Path, config: Path, admin: str = "luksctl-api", env: dict | None = None,
                 ready_timeout: float = 30) -> None:
        self.directory = directory
        self.admin = admin
        self.env = {**(env if env is not None else os.environ), "LUKSCTL_API_CONFIG": str(config)}
        self.ready_timeout = ready_timeout
        self.processes: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        with log.open("ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd="/",
                                       env=env if env is not None else self.env)
        self.processes.append(process)
        return process

    def start_gunicorn(self, argv: list[str], socket_path: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
        process = self.start(argv, log, env)
        wait_until(lambda: process.poll() is None and socket_path.exists(), self.ready_timeout, "gunicorn", interval=0.1)
        return process

    def proxy_config(self, name: str, socket_path: Path, port: int, *, cert: Path, key: Path, user: str) -> Path:
        """nginx's configuration for 127.0.0.1:`port` in front of `socket_path`, as the unit's ExecStartPre= writes it."""
        out = self.directory / f"{name}.conf"
        runtime = self.directory / f"{name}-proxy"
        runtime.mkdir(exist_ok=True)
        subprocess.run([installed(self.admin), "proxy-config", "--output", str(out), "--socket", str(socket_path),
                        "--runtime-dir", str(runtime), "--user", user, "--cert", str(cert), "--key", str(key),
                        "--listen", f"127.0.0.1:{port}"], env=self.env, check=True)
        return out

    def start_nginx(self, name: str, socket_path: Path, port: int, *, cert: Path, key: Path, user: str,
                    log: Path | None = None) -> subprocess.Popen:
        """nginx as `name` (its configuration, runtime directory and, by default, log in `directory`)."""
        conf = self.proxy_config(name, socket_path, port, cert=cert, key=key, user=user)
        process = self.start([NGINX, "-c", str(conf)], log or self.directory / f"{name}.log")
        wait_until(lambda: process.poll() is None and accepts(port), self.ready_timeout, f"nginx {name}", interval=0.1)
        return process

    def stop(self) -> None:
        """nginx before gunicorn (the reverse of starting), each given 60 s."""
        for process in reversed(self.processes):
            process.terminate()
        for process in reversed(self.processes):
            process.wait(timeout=60)
        self.processes.clear()


# --- the front end, as the proxy's and luksctl-client's tests and benchmark serve it -----------

REAL_FRONTEND = "luksctl.api:create_frontend_app()"
FAKE_FRONTEND = "support.fake_frontend:create()"  # the fake bridge and a scripted volume
FAKE_VOLUME_INI = "[luks]\nuuid = 0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10\ncryptdev = xkqzbmwe\nmountpoint = /export\n"
TESTS = DEPLOY.parent / "tests"


class FrontendStack(Serving):
    """The front end on loopback: a config.json allowing ALLOWED and ALSO_ALLOWED (plus `config`),
    a self-signed certificate, gunicorn (one worker) serving `app`, nginx on as many ports as asked."""

    def __init__(self, directory: Path, app: str = REAL_FRONTEND, config: dict | None = None) -> None:
        super().__init__(directory, directory / "config.json")
        self.app = app
        self.extra_config = config or {}
        self.config = directory / "config.json"
        self.runtime = directory / "run"  # the service's private directory (lock, sqlite)
        self.sockets = directory / "sockets"  # gunicorn's socket, reachable by nginx's workers
        self.socket_path = self.sockets / "gunicorn.sock"
        self.cert, self.key = directory / "cert.pem", directory / "key.pem"
        self.gunicorn_log = directory / "gunicorn.log"
        self.port = free_port()
        self.ports = [self.port]

    def write_files(self) -> None:
        self.runtime.mkdir(mode=0o700)
        self.sockets.mkdir(mode=0o755)
        self.directory.chmod(0o755)
        self.config.write_text(json.dumps({
            "ALLOW_PLAIN_HTTP": False, "ALLOWED_CLIENTS": [f"{ALLOWED}/32", f"{ALSO_ALLOWED}/32"],
            "LOCK_FILE": str(self.runtime / "open.lock"), "CRYPTDEV_INI": str(self.directory / "none.ini"), **self.extra_config}))
        subprocess.run([installed("luksctl-api"), "gen-cert", "--cert", str(self.cert), "--key", str(self.key), "--hostname", "localhost"],
                       env=self.env, check=True, capture_output=True)

    def start_app(self) -> None:
        self.start_gunicorn(gunicorn_argv(self.app, self.socket_path, "--workers", "1", "-m", "000", "--pythonpath", str(TESTS)),
                            self.socket_path, self.gunicorn_log)

    def start_proxy(self, name: str, socket_path: Path, port: int) -> None:
        self.start_nginx(name, socket_path, port, cert=self.cert, key=self.key, user=PROXY_USER)


@contextlib.contextmanager
def running_stack(prefix: str, *, fake_volume: bool = False, config: dict | None = None, nginx_ports: int = 1) -> Iterator[FrontendStack]:
    """A FrontendStack serving on `nginx_ports` ports (stack.ports; the first is stack.port, its
    nginx named "nginx"), stopped and removed on exit. fake_volume: the fake front end with a
    described volume."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    config, app = dict(config or {}), REAL_FRONTEND
    if fake_volume:
        (directory / "cryptdev.ini").write_text(FAKE_VOLUME_INI)
        config["CRYPTDEV_INI"], app = str(directory / "cryptdev.ini"), FAKE_FRONTEND
    stack = FrontendStack(directory, app, config)
    stack.write_files()
    try:
        stack.start_app()
        stack.ports += [free_port() for _ in range(nginx_ports - 1)]
        for index, port in enumerate(stack.ports):
            stack.start_proxy(f"nginx-{index}" if index else "nginx", stack.socket_path, port)
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(directory)
