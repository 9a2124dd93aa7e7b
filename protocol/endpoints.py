"""Choosing where a channel binds: `ipc://` on one node, `tcp://` on the node's own address.

The binding side (usually the verifier) calls `bind_endpoint` with its node address and its
peer's; it then publishes the channel's actual endpoint (the OS picks the tcp port) to the
peer, e.g. through a Ray actor call made once at setup.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tempfile
import uuid

WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", "[::]", ""})
_MAX_IPC_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin


def ipc_dir() -> str:
    """Per-user directory for ipc sockets, mode 0700: other users cannot connect. One that
    is there already must be a real directory of this user's: in a shared /tmp another user
    could have made it first (or a symlink to a place of theirs) to receive our sockets."""
    path = os.path.join(tempfile.gettempdir(), f"specray-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory" if not stat.S_ISDIR(st.st_mode) \
            else f"owned by uid {st.st_uid}"
        raise PermissionError(f"{path} is {what}; the ipc socket directory must be a directory of this user's "
                              f"(uid {os.getuid()}): remove it and start again")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def ipc_endpoint(name: str | None = None, directory: str | None = None) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name or uuid.uuid4().hex[:16])
    path = os.path.join(directory or ipc_dir(), f"{name}.sock")
    if len(path) > _MAX_IPC_PATH:
        raise ValueError(f"ipc path too long for a unix socket: {path}")
    return f"ipc://{path}"


def tcp_endpoint(host: str, port: int | None = None) -> str:
    """`tcp://host:port`; port None or 0 lets the OS pick one at bind time."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"tcp://{host}:{'*' if not port else port}"


def bind_endpoint(node_address: str, peer_node_address: str, *, name: str | None = None,
                  port: int | None = None) -> str:
    """Where to bind to serve one peer: ipc if both are on this node, else tcp on our own
    address (never all interfaces)."""
    if node_address == peer_node_address:
        return ipc_endpoint(name)
    return tcp_endpoint(node_address, port)


def endpoint_host(endpoint: str) -> str | None:
    """Host part of a tcp endpoint, None for other transports."""
    if not endpoint.startswith("tcp://"):
        return None
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
    return host.strip("[]")


def is_wildcard(endpoint: str) -> bool:
    host = endpoint_host(endpoint)
    return host is not None and host in WILDCARD_HOSTS


def is_loopback(endpoint: str) -> bool:
    host = endpoint_host(endpoint)
    if host is None:
        return endpoint.startswith(("ipc://", "inproc://"))
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
