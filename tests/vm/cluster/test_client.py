"""luksctl-client in the cluster lab (cluster_lab.py), as a user runs it from another machine:
`status` of the front end and two workers through their real proxies, and `open` with the
user's own token against the real OpenBao: the volume is mounted and the workers remount.

Here, beside test_cluster.py, to share its session lab rather than start another."""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers_vm import VENV_BIN, kernel_state
from support.policies import READ_POLICY

CLIENT = VENV_BIN / "luksctl-client"
PASSPHRASE = "client cluster passphrase"
CREATE_TOKEN = "luksctl-vm-create-token"
# Under software emulation an open plus the workers' remounts took minutes (conftest's Cluster).
OPEN_TIMEOUT = 300
STATUS_TIMEOUT = 60


def client(home: Path, *argv: str, env: dict | None = None, timeout: float = OPEN_TIMEOUT + 60) -> subprocess.CompletedProcess:
    """As the user: their HOME (~/.vault-token, the known-hosts file), nothing else of root's."""
    return subprocess.run([str(CLIENT), "--known-hosts", str(home / "known_hosts"), *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "HOME": str(home), **(env or {})})


def status_rows(home: Path, hosts: list[str]) -> list[list[str]]:
    done = client(home, "status", "--timeout", str(STATUS_TIMEOUT), *hosts)
    assert done.returncode == 0, done.stdout + done.stderr
    return [line.split() for line in done.stdout.splitlines()[1:]]


def test_client_status_of_the_front_end_and_two_workers_then_open_mounts(cluster, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    workers = cluster.lab.ips[:2]
    hosts = ["127.0.0.1", *workers]
    volume = cluster.volumes(PASSPHRASE)
    secret_path = cluster.bao.store_passphrase("client-sub", volume.uuid, PASSPHRASE)

    assert status_rows(home, hosts) == [["127.0.0.1:5000", "unmounted", "-", "-"]] + [[f"{ip}:5000", "-", "unmounted", "-"] for ip in workers]
    assert len((home / "known_hosts").read_text().splitlines()) == 3  # each certificate recorded on first use

    # The user's token may create the open's wrapping token (and holds the read policy it hands on).
    cluster.bao.put_policy(CREATE_TOKEN, 'path "auth/token/create" { capabilities = ["create", "update"] }')
    token = cluster.bao.request("POST", "auth/token/create", json={
        "policies": [CREATE_TOKEN, READ_POLICY], "no_default_policy": True, "ttl": "15m"}).json()["auth"]["client_token"]
    (home / ".vault-token").write_text(token)

    done = client(home, "open", "127.0.0.1", "--secret-path", secret_path, "--timeout", str(OPEN_TIMEOUT), env={"VAULT_ADDR": cluster.bao.url})

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "127.0.0.1:5000  volume_state mounted\n"
    assert kernel_state(volume) == ("mounted", True)
    assert status_rows(home, hosts) == [["127.0.0.1:5000", "mounted", "-", "-"]] + [[f"{ip}:5000", "-", "mounted", "-"] for ip in workers]
    for secret in (PASSPHRASE, token):
        assert secret not in done.stdout + done.stderr
