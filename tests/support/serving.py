"""The front end as deployed, on loopback: nginx with the configuration `luksctl-api proxy-config`
writes, in front of gunicorn with deploy/gunicorn.conf.py on a Unix socket, both real. Used by the
proxy's tests and by luksctl-client's (tests and benchmark).

127.0.0.1 and 127.0.0.2 are in ALLOWED_CLIENTS, 127.0.0.3 is not (the kernel routes all of
127/8 to lo, so a client picks its address by binding it).
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

from support.net import free_port
from support.waiting import wait_until

from luksctl.api.admin import main_frontend

TESTS = Path(__file__).resolve().parents[1]
DEPLOY = TESTS.parent / "deploy"
NGINX = "/usr/sbin/nginx"
ALLOWED, ALSO_ALLOWED, REFUSED = "127.0.0.1", "127.0.0.2", "127.0.0.3"
# nginx's workers drop to this user here; in a deployment to luksctl_proxy (both have a group of
# the same name, as nginx's `user` directive needs).
PROXY_USER = "daemon"
REAL_FRONTEND = "luksctl.api:create_frontend_app()"
FAKE_FRONTEND = "support.fake_frontend:create()"  # the fake bridge and a scripted volume
FAKE_VOLUME_INI = "[luks]\nuuid = 0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10\ncryptdev = xkqzbmwe\nmountpoint = /export\n"


class Stack:
    """`app`: the gunicorn app (tests/ is on its path); `config`: what config.json adds or overrides."""

    def __init__(self, directory: Path, app: str = REAL_FRONTEND, config: dict | None = None) -> None:
        self.directory = directory
        self.app = app
        self.extra_config = config or {}
        self.config = directory / "config.json"
        self.runtime = directory / "run"  # the service's private directory (lock, sqlite)
        self.sockets = directory / "sockets"  # gunicorn's socket, reachable by nginx's workers
        self.cert, self.key = directory / "cert.pem", directory / "key.pem"
        self.gunicorn_log = directory / "gunicorn.log"
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []

    def write_files(self) -> None:
        self.runtime.mkdir(mode=0o700)
        self.sockets.mkdir(mode=0o755)
        self.directory.chmod(0o755)
        self.config.write_text(json.dumps({
            "ALLOW_PLAIN_HTTP": False, "ALLOWED_CLIENTS": [f"{ALLOWED}/32", f"{ALSO_ALLOWED}/32"],
            "LOCK_FILE": str(self.runtime / "open.lock"), "CRYPTDEV_INI": str(self.directory / "none.ini"), **self.extra_config}))
        assert main_frontend(["gen-cert", "--cert", str(self.cert), "--key", str(self.key), "--hostname", "localhost"]) == 0

    def nginx_conf(self, name: str, socket_path: Path, port: int) -> Path:
        out = self.directory / f"{name}.conf"
        runtime = self.directory / f"{name}-proxy"
        runtime.mkdir(exist_ok=True)
        os.environ["LUKSCTL_API_CONFIG"] = str(self.config)
        try:
            assert main_frontend(["proxy-config", "--output", str(out), "--socket", str(socket_path), "--runtime-dir", str(runtime),
                                  "--user", PROXY_USER, "--cert", str(self.cert), "--key", str(self.key),
                                  "--listen", f"127.0.0.1:{port}"]) == 0
        finally:
            del os.environ["LUKSCTL_API_CONFIG"]
        return out

    def start(self, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        with log.open("ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=out, env=env, stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def start_nginx(self, name: str, socket_path: Path, port: int) -> None:
        conf = self.nginx_conf(name, socket_path, port)
        process = self.start([NGINX, "-c", str(conf)], self.directory / f"{name}.log")
        wait_until(lambda: process.poll() is None and accepts(port), 30, f"nginx {name}", interval=0.1)

    def start_gunicorn(self) -> None:
        socket_path = self.sockets / "gunicorn.sock"
        process = self.start(
            [sys.executable, "-m", "gunicorn", "-c", str(DEPLOY / "gunicorn.conf.py"), "--workers", "1",
             "--bind", f"unix:{socket_path}", "-m", "000", "--pythonpath", str(TESTS), self.app],
            self.gunicorn_log, env={**os.environ, "LUKSCTL_API_CONFIG": str(self.config)})
        wait_until(lambda: process.poll() is None and socket_path.exists(), 30, "gunicorn", interval=0.1)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=30)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def running_stack(prefix: str, *, fake_volume: bool = False, config: dict | None = None, nginx_ports: int = 1) -> Iterator[Stack]:
    """A Stack serving on `nginx_ports` ports (stack.ports; the first is stack.port, its nginx
    named "nginx"), stopped and removed on exit. fake_volume: the fake front end with a described
    volume. Not under pytest's base directory: that is root's only (0700), and nginx's workers,
    which are not root, must reach gunicorn's socket."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    config, app = dict(config or {}), REAL_FRONTEND
    if fake_volume:
        (directory / "cryptdev.ini").write_text(FAKE_VOLUME_INI)
        config["CRYPTDEV_INI"], app = str(directory / "cryptdev.ini"), FAKE_FRONTEND
    stack = Stack(directory, app, config)
    stack.write_files()
    try:
        stack.start_gunicorn()
        stack.ports = [stack.port] + [free_port() for _ in range(nginx_ports - 1)]
        for index, port in enumerate(stack.ports):
            stack.start_nginx(f"nginx-{index}" if index else "nginx", stack.sockets / "gunicorn.sock", port)
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(directory)
