"""A service as deployed, on loopback: gunicorn on a Unix socket behind nginx with the
configuration `luksctl-api proxy-config` (or `luksctl-api-wn proxy-config`) writes.

Used by the proxy's tests (tests/unit/test_proxy.py, tests/contract/test_schemathesis.py's
proxied runs) and scripts/bench_status.py. One nginx per listen port: start_nginx as often as ports are
needed, each in front of any socket (one that does not exist gives nginx's own 502).

The directory must be reachable by nginx's workers, which are not root: not under pytest's
base directory (root's only, 0700).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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
