"""deploy/ansible: the role is lint-clean, parses, and documents every variable it reads.

Running it is tested for real in the systemd boot (tests/vm/systemd/test_ansible_role.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jinja2
import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
ROLE = ANSIBLE_DIR / "roles" / "luksctl"
VENV_BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=300)


def test_the_role_and_playbook_pass_ansible_lint_production_profile():
    result = run(str(VENV_BIN / "ansible-lint"), "--nocolor")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_the_sample_playbook_parses_with_both_sample_inventories():
    for inventory in ("single_vm", "cluster"):
        result = run(str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i", f"inventory/{inventory}.yml", "site.yml")
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_role_default_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Install with Ansible", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z_]+)`", section))

    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())

    assert set(defaults) - documented == set()


def test_the_package_step_names_debian_packages_this_host_has(tmp_path):
    """tasks/packages.yml in check mode on this host, which scripts/install-host-deps.sh gave the
    same packages: every name resolves and nothing would be installed. (The systemd VM boot runs
    the role without this step: there apt's check costs over a minute per host and run.)"""
    plays = [{"name": f"packages of a {node}", "hosts": "localhost", "gather_facts": False,
              "tasks": [{"name": "The role's package step", "ansible.builtin.include_role": {"name": "luksctl", "tasks_from": "packages"},
                         "vars": {"luksctl_node_role": node, "luksctl_infrastructure": "cluster"}}]}
             for node in ("frontend", "worker")]
    playbook = tmp_path / "packages.yml"
    playbook.write_text(yaml.safe_dump(plays))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROLE.parent), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
           "ANSIBLE_REMOTE_TMP": str(tmp_path / "remote-tmp"), "ANSIBLE_NOCOLOR": "1"}

    result = subprocess.run([str(VENV_BIN / "ansible-playbook"), "--check", "-c", "local", "-i", "localhost,",
                             "-e", "ansible_python_interpreter=/usr/bin/python3", str(playbook)],
                            capture_output=True, text=True, timeout=300, env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^localhost\s*:\s*ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", result.stdout, re.M), result.stdout
    assert result.stdout.count("TASK [luksctl : Install the packages this node needs]") == 2, result.stdout


def test_workers_fstab_lines_mount_the_export_nosuid_nodev_whatever_the_options(tmp_path):
    """The role's fstab task, run for real on a copy of an fstab: the default options, options that
    ask for suid and dev, and a line written before (replaced, not doubled)."""
    task, = [task for task in yaml.safe_load((ROLE / "tasks" / "cluster.yml").read_text())
             if task["name"].startswith("Mount the front end's export at boot")]
    fstab = tmp_path / "fstab"
    fstab.write_text("/dev/vda1 / ext4 defaults 0 1\nfe:/export /export nfs4 rw,nofail,_netdev 0 0\n")
    task["ansible.builtin.lineinfile"]["path"] = str(fstab)
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    mounts = [{"src": "fe:/export", "path": "/export"}, {"src": "fe:/home", "path": "/home", "opts": "rw,suid,dev,soft"}]
    playbook = tmp_path / "fstab.yml"
    playbook.write_text(yaml.safe_dump([{"name": "fstab", "hosts": "localhost", "gather_facts": False, "tasks": [task],
                                         "vars": {"luksctl_node_role": "worker", "luksctl_nfs_mounts": mounts,
                                                  "luksctl_nfs_mount_options": defaults["luksctl_nfs_mount_options"]}}]))
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_NOCOLOR": "1"}

    result = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-c", "local", "-i", "localhost,",
                             "-e", f"ansible_python_interpreter={sys.executable}", str(playbook)],
                            capture_output=True, text=True, timeout=300, env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert fstab.read_text().splitlines() == [
        "/dev/vda1 / ext4 defaults 0 1",
        "fe:/export /export nfs4 rw,nofail,_netdev,nosuid,nodev 0 0",
        "fe:/home /home nfs4 rw,soft,nosuid,nodev 0 0",
    ]


def test_the_front_end_gets_the_report_timer_install_sh_installs_enabled_and_started():
    """install.sh frontend installs luksctl-report.service and .timer and runs `enable --now` on the
    timer; the role must do the same on a front end, and only there. (The systemd VM boot runs it.)"""
    tasks = yaml.safe_load((ROLE / "tasks" / "service.yml").read_text())
    install_sh = (REPO / "deploy" / "install.sh").read_text()
    copied, = [task for task in tasks if "luksctl-report.timer" in task.get("loop", []) and "ansible.builtin.copy" in task]
    started, = [task for task in tasks if "ansible.builtin.systemd_service" in task]

    assert copied["loop"] == re.findall(r'"\$repo/deploy/(luksctl-report\.\w+)"', install_sh)
    assert copied["ansible.builtin.copy"]["dest"] == "/etc/systemd/system/{{ item }}"
    assert copied["when"] == "luksctl_node_role == 'frontend'"
    assert tasks.index(copied) < tasks.index(started)
    assert "systemctl enable --now luksctl-report.timer" in install_sh
    assert started["ansible.builtin.systemd_service"] == {
        "name": "{{ item }}", "enabled": True, "state": "started", "daemon_reload": "{{ ansible_loop.first }}"}
    assert started["when"] == "luksctl_manage_service"
    units = {role: jinja2.Template(started["loop"]).render(luksctl_service="luksctl-api", luksctl_node_role=role)
             for role in ("frontend", "worker")}
    assert units == {"frontend": "['luksctl-api.service', 'luksctl-proxy@luksctl-api.service', 'luksctl-report.timer']",
                     "worker": "['luksctl-api.service', 'luksctl-proxy@luksctl-api.service']"}


def test_config_json_for_a_single_vm_and_a_cluster_front_end_passes_the_services_check_config(tmp_path):
    """The role's config.json task, run for real with the role's vars and validated by the installed
    luksctl-api check-config, as on a node: a single VM (no worker setting) and a cluster front end
    with two workers (every worker's address, in inventory order). The systemd boot runs the role
    for a cluster only; this is where the single-VM file is checked."""
    task, = [task for task in yaml.safe_load((ROLE / "tasks" / "service.yml").read_text())
             if task["name"].startswith("Write config.json")]
    for ownership in ("owner", "group"):  # root's on a node; the VM test checks it there
        del task["ansible.builtin.copy"][ownership]
    lock_dir = tmp_path / "run"
    lock_dir.mkdir(mode=0o700)
    inventory = {"all": {"children": {
        "luksctl_frontend": {"hosts": {"localhost": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}},
        "luksctl_workers": {"hosts": {"wn1": {"luksctl_node_address": "10.0.0.11"}, "wn2": {"luksctl_node_address": "10.0.0.12"}}}}}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_NOCOLOR": "1"}
    written = {}
    for infrastructure in ("single_vm", "cluster"):
        config_dir = tmp_path / infrastructure
        config_dir.mkdir()
        playbook = tmp_path / f"{infrastructure}.yml"
        playbook.write_text(yaml.safe_dump([{
            "name": "config.json", "hosts": "luksctl_frontend", "gather_facts": False, "tasks": [task],
            "vars_files": [str(ROLE / "vars" / "main.yml")],
            "vars": {**defaults, "luksctl_node_role": "frontend", "luksctl_infrastructure": infrastructure,
                     "luks_config_path": str(config_dir), "luksctl_vault_url_allowlist": ["https://vault.example:8200"],
                     "luksctl_api_extra_config": {"LOCK_FILE": str(lock_dir / "luksctl-api.lock")}},
            "handlers": [{"name": "Restart luksctl", "ansible.builtin.debug": {"msg": "notified"}}]}]))
        # The venv this test runs from, over the role's fixed one (vars/main.yml outranks play vars).
        venv = json.dumps({"luksctl_venv": str(VENV_BIN.parent)})

        result = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(tmp_path / "inventory.yml"), "-e", venv, str(playbook)],
                                capture_output=True, text=True, timeout=300, env=env)

        assert result.returncode == 0, result.stdout + result.stderr
        written[infrastructure] = json.loads((config_dir / "config.json").read_text())
    common = {"VAULT_URL_ALLOWLIST": ["https://vault.example:8200"], "LOCK_FILE": str(lock_dir / "luksctl-api.lock")}
    assert written == {
        "single_vm": {"INFRASTRUCTURE_CONFIGURATION": "single_vm", **common},
        "cluster": {"INFRASTRUCTURE_CONFIGURATION": "cluster", **common, "WN_IPS": ["10.0.0.11", "10.0.0.12"],
                    "WN_CA_BUNDLE": str(tmp_path / "cluster" / "wn-ca-bundle.pem")}}


def test_the_cluster_tasks_give_two_workers_one_token_and_the_front_end_both_certificates_exports_and_their_mounts(tmp_path):
    """The role's cluster tasks, run for real on three local hosts, each with its own directory for
    /etc/luks, /etc/exports and /etc/fstab: the front end and two workers, twice. What the systemd
    boot checks with one worker, here with two: one token everywhere, a bundle of both
    certificates in inventory order, one export line naming both, a mount on each; the second run
    changes nothing."""
    tasks = yaml.safe_load((ROLE / "tasks" / "cluster.yml").read_text())
    for task in tasks:
        module = task.get("ansible.builtin.copy") or task.get("ansible.builtin.lineinfile") or {}
        for ownership in ("owner", "group"):  # root and the service group on a node; the VM test checks them
            module.pop(ownership, None)
        if module.get("path") in ("/etc/exports", "/etc/fstab"):
            module["path"] = "{{ node_root }}/" + Path(module["path"]).name
    hosts = {"fe": "10.0.0.10", "wn1": "10.0.0.11", "wn2": "10.0.0.12"}
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {"all": {"children": {
        group: {"hosts": {name: {**local, "luksctl_node_address": hosts[name], "node_root": str(tmp_path / name),
                                 "luks_config_path": str(tmp_path / name / "luks")} for name in names}}
        for group, names in (("luksctl_frontend", ["fe"]), ("luksctl_workers", ["wn1", "wn2"]))}}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    for name in hosts:
        (tmp_path / name / "luks").mkdir(parents=True)
    for name in hosts:
        (tmp_path / name / "fstab").write_text("/dev/vda1 / ext4 defaults 0 1\n")
    for name in ("wn1", "wn2"):  # gen-cert's, on a real node
        (tmp_path / name / "luks" / "gunicorn-cert.pem").write_text(f"-----BEGIN CERTIFICATE-----\n{name}\n-----END CERTIFICATE-----\n")
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    del defaults["luks_config_path"]  # each host's, from the inventory (play vars outrank it)
    playbook = tmp_path / "cluster.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "cluster", "hosts": "luksctl_frontend:luksctl_workers", "gather_facts": False, "tasks": tasks,
        "vars_files": [str(ROLE / "vars" / "main.yml")],
        "vars": {**defaults, "luksctl_infrastructure": "cluster", "mountpoint": "/export",
                 "luksctl_nfs_mounts": [{"src": "10.0.0.10:/export", "path": "{{ node_root }}/export"}]},
        "handlers": [{"name": name, "ansible.builtin.debug": {"msg": "notified"}}
                     for name in ("Restart luksctl", "Reload the NFS exports")]}]))
    # The venv this test runs from, over the role's fixed one (the token is made with its python).
    venv = json.dumps({"luksctl_venv": str(VENV_BIN.parent)})
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_NOCOLOR": "1"}

    def play() -> dict[str, int]:
        result = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(tmp_path / "inventory.yml"), "-e", venv, str(playbook)],
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return {host: int(changed) for host, changed in re.findall(r"^(\w+)\s*:\s*ok=\d+\s+changed=(\d+)", result.stdout, re.M)}

    first = play()
    second = play()

    token = (tmp_path / "fe" / "luks" / "cluster-token").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", token)
    for name in ("wn1", "wn2"):
        assert (tmp_path / name / "luks" / "cluster-token").read_text() == token
        assert (tmp_path / name / "fstab").read_text().splitlines() == [
            "/dev/vda1 / ext4 defaults 0 1", f"10.0.0.10:/export {tmp_path / name / 'export'} nfs4 rw,nofail,_netdev,nosuid,nodev 0 0"]
        assert (tmp_path / name / "export").is_dir()
        assert not (tmp_path / name / "exports").exists() and not (tmp_path / name / "luks" / "wn-ca-bundle.pem").exists()
    assert (tmp_path / "fe" / "luks" / "wn-ca-bundle.pem").read_text() == "".join(
        (tmp_path / name / "luks" / "gunicorn-cert.pem").read_text() for name in ("wn1", "wn2"))
    options = defaults["luksctl_nfs_export_options"]
    assert (tmp_path / "fe" / "exports").read_text() == f"/export 10.0.0.11({options}) 10.0.0.12({options})\n"
    assert (tmp_path / "fe" / "fstab").read_text() == "/dev/vda1 / ext4 defaults 0 1\n"
    assert all(first.values()) and second == {"fe": 0, "wn1": 0, "wn2": 0}, (first, second)
