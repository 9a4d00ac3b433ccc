"""The dashboard's Vault policies (PROTOCOL §3, §7), defined once for every test server.

Each covers the secrets of every KV mount the server has, so that tests of KV v1
(host) get the same two policies as the dashboard's KV v2 layout.
"""

from __future__ import annotations

READ_POLICY = "luksctl-read"  # the open's: the token inside the open's wrapping token reads the secret
WRITE_ONLY = "write_only"  # setup's, at deployment time: create only, no read, no update
DELETE_ONLY = "delete_only"  # decommission's, for removing a deployment: every version of the secret


def secrets_rule(capabilities: list[str], mounts: dict[str, str | None], kv2_part: str = "data") -> str:
    """HCL giving `capabilities` on the secrets of each mount (name -> KV version, None: plain
    `kv`); on KV v2, under `kv2_part` (data or metadata)."""
    paths = [f"{name}/{kv2_part}/*" if version == "2" else f"{name}/*" for name, version in mounts.items()]
    granted = ", ".join(f'"{capability}"' for capability in capabilities)
    return "\n".join(f'path "{path}" {{ capabilities = [{granted}] }}' for path in paths)


def dashboard_policies(mounts: dict[str, str | None]) -> dict[str, str]:
    return {READ_POLICY: secrets_rule(["read"], mounts), WRITE_ONLY: secrets_rule(["create"], mounts),
            DELETE_ONLY: secrets_rule(["delete"], mounts, "metadata")}
