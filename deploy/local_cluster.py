"""A multi-node Ray cluster on this one machine, started the way users start theirs.

Each node is a set of Linux namespaces: a network namespace with its own address on a
bridge (10.77.0.0/24; nothing routes out of it), a PID namespace (so `ray stop` on a node
stops that node's Ray only, as on a real machine) and a mount namespace (its own /proc,
/tmp/ray and root home). Each runs an SSH server on its address, with a key made for the
cluster. Then `ray up deploy/cluster-local.yaml` starts Ray on every node over SSH, as it
would on machines, and `ray down` stops it.

    python deploy/local_cluster.py up        # as root: nodes, SSH servers, `ray up`
    python deploy/local_cluster.py status    # the nodes and what Ray says of them
    python deploy/local_cluster.py down      # `ray down`, then every node, link and file gone

The nodes share this machine's filesystem, so they run this checkout's `.venv` (through
the link `~/.specray-local/repo` in each node's home, which the YAML names) and need no
install. Needs root, `ip`, `unshare`, `ssh`, and Debian's openssh-server and rsync
(installed with apt-get if missing).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "deploy" / "cluster-local.yaml"
STATE = Path("/var/tmp/specray-local")  # keys, sshd configs, each node's /tmp/ray
LINK = Path.home() / ".specray-local"  # here: the cluster's SSH key and Ray token; on each node: repo -> this checkout
BRIDGE, HOST_IP, PREFIX = "spbr0", "10.77.0.1", 24


@dataclass(frozen=True)
class Node:
    name: str  # also its network namespace
    ip: str

    @property
    def veth(self) -> str:  # host side of its link; the namespace side is "eth0"
        return f"v-{self.name}"


NODES = (Node("sp-head", "10.77.0.10"), Node("sp-w1", "10.77.0.11"))  # as in cluster-local.yaml


def sh(*cmd: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    if not quiet:
        print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, text=True, capture_output=quiet)


def missing_tools() -> list[str]:
    return [t for t in ("ip", "unshare", "ssh", "ssh-keygen") if shutil.which(t) is None]


def check_machine() -> None:
    """Everything `up` needs, said at once, before anything is changed."""
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root (namespaces and a bridge need it)")
    if missing := missing_tools():
        problems.append(f"missing commands: {', '.join(missing)} (apt-get install iproute2 util-linux "
                        "openssh-client)")
    if not (REPO / ".venv" / "bin" / "ray").exists():
        problems.append(f"no {REPO}/.venv with Ray: run `make install` first")
    if problems:
        sys.exit("local_cluster: " + "; ".join(problems))


def install_sshd() -> Path:
    """The SSH server the nodes run, and rsync, which `ray up` copies files with."""
    sshd = Path("/usr/sbin/sshd")
    packages = [p for p, there in (("openssh-server", sshd.exists()), ("rsync", shutil.which("rsync"))) if not there]
    if packages:
        print(f"installing {' '.join(packages)} ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], check=True, env=env)
        # the package may start a system-wide sshd on port 22; the nodes run their own
        subprocess.run(["sh", "-c", "service ssh stop || true"], check=False)
    return sshd


def make_keys() -> None:
    """A client key for `ray up` (and the head's autoscaler), one host key, a Ray token."""
    STATE.mkdir(parents=True, exist_ok=True)
    LINK.mkdir(exist_ok=True)
    key = LINK / "id_ed25519"
    if not key.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "specray-local", "-f", str(key))
    host_key = STATE / "ssh_host_ed25519_key"
    if not host_key.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
    (STATE / "authorized_keys").write_text((LINK / "id_ed25519.pub").read_text())
    token = LINK / "auth_token"  # the cluster's Ray token: `ray up` copies it to ~/.ray/ on each node
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)


def sshd_config(node: Node) -> Path:
    path = STATE / f"sshd_{node.name}.conf"
    path.write_text("\n".join([
        f"ListenAddress {node.ip}",
        f"HostKey {STATE / 'ssh_host_ed25519_key'}",
        f"AuthorizedKeysFile {STATE / 'authorized_keys'}",
        f"PidFile {STATE / f'sshd_{node.name}.pid'}",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "MaxStartups 100",  # the autoscaler opens many sessions at once
        "AcceptEnv RAY_*",
        "",
    ]))
    return path


def start_node(node: Node, sshd: Path) -> None:
    sh("ip", "netns", "add", node.name)
    sh("ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.name)
    sh("ip", "link", "set", node.veth, "master", BRIDGE, "up")
    ns = ("ip", "netns", "exec", node.name)
    sh(*ns, "ip", "addr", "add", f"{node.ip}/{PREFIX}", "dev", "eth0")
    sh(*ns, "ip", "link", "set", "eth0", "up")
    sh(*ns, "ip", "link", "set", "lo", "up")
    # a default route, as a machine has: Ray finds a node's own address by opening a UDP
    # socket towards a public one (nothing is sent); without a route it falls back to the
    # hostname's address, the host's. Nothing is forwarded beyond the bridge.
    sh(*ns, "ip", "route", "add", "default", "via", HOST_IP)
    ray_tmp, home = STATE / node.name / "ray", node_home(node)
    ray_tmp.mkdir(parents=True, exist_ok=True)
    (home / ".specray-local").mkdir(parents=True, exist_ok=True)
    (home / ".specray-local" / "repo").symlink_to(REPO)
    # the built-in models: one cache for all nodes, as a shared model volume would be
    # (each node joining its own 1.5 GB copy first costs a minute and the disk)
    (home / ".cache").mkdir(exist_ok=True)
    (home / ".cache" / "specray").symlink_to(host_cache())
    # root's home on the node is its own, as on a machine of its own: what `ray up` copies
    # there (bootstrap config and key, the auth token) and shell start-up files stay there
    passwd = STATE / node.name / "passwd"
    passwd.write_text("".join(
        f"root:x:0:0:root:{home}:/bin/bash\n" if line.startswith("root:") else line
        for line in Path("/etc/passwd").read_text().splitlines(keepends=True)))
    Path("/tmp/ray").mkdir(exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    # its own PID and mount namespaces: sshd is PID 1's child there, and every session it
    # opens (Ray's processes too) sees only this node's processes, /tmp/ray and home
    inner = (f"mount --make-rprivate / && mount -t proc proc /proc && mount --bind {ray_tmp} /tmp/ray && "
             f"mount --bind {passwd} /etc/passwd && "
             f"exec {sshd} -D -e -f {sshd_config(node)} > {STATE / node.name / 'sshd.log'} 2>&1")
    subprocess.Popen([*ns, "unshare", "--pid", "--fork", "--mount", "sh", "-c", inner],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def host_cache() -> Path:
    """specray's model cache here (`actors.paths`'s rule: $SPECRAY_CACHE, else ~/.cache/specray)."""
    path = Path(os.environ.get("SPECRAY_CACHE", Path.home() / ".cache" / "specray"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def node_home(node: Node) -> Path:
    return STATE / node.name / "home"


def wait_for_ssh(node: Node, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = sh(*ssh_args(node), "true", check=False, quiet=True)
        if r.returncode == 0:
            return
        time.sleep(0.5)
    sys.exit(f"local_cluster: no SSH on {node.name} ({node.ip}) after {timeout_s:.0f} s; "
             f"see {STATE / node.name / 'sshd.log'}")


def ssh_args(node: Node) -> list[str]:
    return ["ssh", "-i", str(LINK / "id_ed25519"), "-o", "StrictHostKeyChecking=no", "-o",
            "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", f"root@{node.ip}"]


def ray_cli() -> str:
    return str(REPO / ".venv" / "bin" / "ray")


def up(args: argparse.Namespace) -> None:
    check_machine()
    if Path(f"/run/netns/{NODES[0].name}").exists():
        sys.exit("local_cluster: the nodes exist already (`down` first)")
    sshd = install_sshd()
    make_keys()
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for node in NODES:
        start_node(node, sshd)
    for node in NODES:
        wait_for_ssh(node)
    print(f"nodes up: {', '.join(f'{n.name} {n.ip}' for n in NODES)}", flush=True)
    if not args.no_ray:
        sh(ray_cli(), "up", "-y", "--no-config-cache", str(CONFIG))


def down(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        sys.exit("local_cluster: run as root")
    if Path(f"/run/netns/{NODES[0].name}").exists() and not args.no_ray:
        sh(ray_cli(), "down", "-y", str(CONFIG), check=False)
    for node in NODES:  # every process left in a node (sshd and what its sessions started)
        r = sh("ip", "netns", "pids", node.name, check=False, quiet=True)
        for p in (r.stdout or "").split():
            sh("kill", "-9", p, check=False, quiet=True)
        sh("ip", "link", "del", node.veth, check=False, quiet=True)
        sh("ip", "netns", "del", node.name, check=False, quiet=True)
    sh("ip", "link", "del", BRIDGE, check=False, quiet=True)
    shutil.rmtree(STATE, ignore_errors=True)
    shutil.rmtree(LINK, ignore_errors=True)
    # what `ray up` leaves on the client: the local provider's node list (its SSH control
    # sockets under /tmp/ray_ssh_* may serve other clusters too: left)
    for suffix in (".state", ".lock"):
        Path(f"/tmp/ray/cluster-specray-local{suffix}").unlink(missing_ok=True)
    print("local cluster gone", flush=True)


def status(args: argparse.Namespace) -> None:
    for node in NODES:
        here = Path(f"/run/netns/{node.name}").exists()
        print(f"{node.name} {node.ip}: {'up' if here else 'absent'}")
    if Path(f"/run/netns/{NODES[0].name}").exists():
        sh(*ssh_args(NODES[0]), "RAY_AUTH_MODE=token ~/.specray-local/repo/.venv/bin/ray status", check=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("up", "down", "status"))
    p.add_argument("--no-ray", action="store_true", help="up: build the nodes only; down: skip `ray down`")
    args = p.parse_args(argv)
    {"up": up, "down": down, "status": status}[args.command](args)


if __name__ == "__main__":
    main()
