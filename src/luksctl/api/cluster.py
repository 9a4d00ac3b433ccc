"""Front end -> worker nodes: parallel calls with a per-node outcome.

One dead or slow worker costs at most the deadline, never the front end's
own answer: every call runs in a bounded pool and whatever has not finished
by the deadline is reported as "timeout".
"""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import json
import logging
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from .. import vault
from . import metrics
from ..config import FrontendConfig, ensure_root_owned
from ..errors import ConfigError, VaultError

log = logging.getLogger(__name__)

WORKER_PREFIX = "/luksctl_api_wn/v1.0"
TOKEN_HEADER = "X-Luksctl-Token"
MAX_PARALLEL = 32


@dataclass(frozen=True)
class WorkerClient:
    scheme: str
    port: int
    verify: bool | str
    connect_timeout: float
    read_timeout: float
    token: str | None

    @classmethod
    def from_config(cls, config: FrontendConfig) -> "WorkerClient":
        return cls(
            scheme=config.WN_SCHEME,
            port=config.WN_PORT,
            verify=config.WN_CA_BUNDLE or config.WN_TLS_VERIFY,
            connect_timeout=config.WN_CONNECT_TIMEOUT,
            read_timeout=config.WN_READ_TIMEOUT,
            token=read_token(Path(config.CLUSTER_TOKEN_FILE), missing_ok=True),
        )

    @property
    def deadline(self) -> float:
        return self.connect_timeout + self.read_timeout + 1

    def url(self, host: str, endpoint: str) -> str:
        try:
            netloc = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
        except ValueError:
            netloc = host
        return f"{self.scheme}://{netloc}:{self.port}{WORKER_PREFIX}/{endpoint}"

    def tls(self) -> ssl.SSLContext | None:
        """WN_CA_BUNDLE (or the system bundle, or no verification) for https; None for http."""
        if self.scheme != "https":
            return None
        return vault.tls_context(self.verify if isinstance(self.verify, str) else None, verify=self.verify is not False)

    def call(self, host: str, method: str, endpoint: str) -> str:
        """The worker's nfs_state, or why there is none; never raises."""
        headers = {TOKEN_HEADER: self.token} if self.token else {}
        # The deadline ends the call even against a worker that trickles its answer, so a
        # stuck call does not keep its pool thread; no redirect takes the token elsewhere.
        try:
            with vault.Deadline(self.deadline) as deadline:
                status, raw = vault.request(
                    method, self.url(host, endpoint), deadline=deadline, tls=self.tls(), headers=headers,
                    connect_timeout=self.connect_timeout, timeout=self.read_timeout,
                )
        except vault.RedirectRefused:
            log.warning("worker %s answered %s with a redirect; not followed", host, endpoint)
            return "error"
        except (ssl.SSLError, ssl.CertificateError):
            log.warning("worker %s: TLS verification failed (check WN_CA_BUNDLE)", host)
            return "tls-error"
        except TimeoutError:  # a socket timeout or the deadline
            log.warning("worker %s: no answer within %g s; it may still finish", host, self.read_timeout)
            return "timeout"
        except (OSError, http.client.HTTPException, VaultError) as exc:
            log.warning("worker %s: %s", host, exc.__class__.__name__)
            return "unreachable"
        if status in (401, 403):
            log.warning("worker %s refused %s: wrong or missing cluster token", host, endpoint)
            return "refused"
        try:
            state = json.loads(raw)["nfs_state"]
        except (ValueError, KeyError, TypeError):
            log.warning("worker %s answered %s without nfs_state", host, status)
            return "error"
        return state if isinstance(state, str) else "error"


def read_token(path: Path, *, missing_ok: bool = False) -> str | None:
    """The shared secret that proves to workers that a call comes from their front end.

    Held to the rule of the other /etc/luks files (root-owned, written by root only), and
    being a secret, unreadable by others: the service reads it through its group.
    """
    try:
        ensure_root_owned(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & stat.S_IROTH:
            raise ConfigError(f"the cluster token {path} is readable by others (mode {mode:o}): chmod 0640 it, group the service's")
        token = path.read_text().strip()
    except FileNotFoundError:
        if missing_ok:
            log.warning("no cluster token at %s: nfs-mount calls carry no proof of origin", path)
            return None
        raise ConfigError(f"the cluster token {path} does not exist (copy it from the front end)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster token {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"the cluster token file {path} is empty")
    return token


def fan_out(client: WorkerClient, hosts: list[str], method: str, endpoint: str) -> dict[str, str]:
    """Call every host at once; a host still running at the deadline is "timeout"."""
    if not hosts:
        return {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(len(hosts), MAX_PARALLEL), thread_name_prefix="worker-call")
    try:
        futures = {host: pool.submit(client.call, host, method, endpoint) for host in hosts}
        concurrent.futures.wait(futures.values(), timeout=client.deadline)
        answers = {host: future.result() if future.done() else "timeout" for host, future in futures.items()}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a stuck call must not hold the answer
    metrics.count_fanout(endpoint, answers)
    return answers


def remount_workers(client: WorkerClient, hosts: list[str]) -> dict[str, str]:
    return fan_out(client, hosts, "POST", "nfs-mount")


def worker_states(client: WorkerClient, hosts: list[str]) -> dict[str, str]:
    return fan_out(client, hosts, "GET", "status")
