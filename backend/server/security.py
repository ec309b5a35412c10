"""Keys and the bind policy: who may reach the server, and how they are told apart.

Without keys the server binds only addresses no other machine can reach. With keys
(CURVE) every client proves a public key from the allowlist, and that key, not the
routing id a client picks for itself, is what owns its jobs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import zmq

from backend.errors import UnderstudyError
from shared.errors import ErrorCode

log = logging.getLogger("understudy.server")


class ServerConfigError(UnderstudyError):
    """The server cannot start with these options."""

    code = ErrorCode.SERVER_CONFIG


def is_loopback(address: str) -> bool:
    """True for addresses no other machine can reach: 127.0.0.0/8, ::1, localhost, ipc, inproc.

    The host must be exactly `localhost` or a loopback IP literal; a name such as
    127.evil.example.com resolves wherever its owner likes, so it is not loopback.
    """
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    try:
        host = urlsplit(f"//{rest}").hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_allowed(address: str, keys_dir: Path | None, insecure: bool) -> None:
    """Refuse an unencrypted server on a network address unless asked for explicitly."""
    if keys_dir is None and not insecure and not is_loopback(address):
        raise ServerConfigError(
            f"Refusing to serve {address} without encryption; create keys with `python -m "
            "backend keys DIR` and pass --keys DIR, or bind 127.0.0.1, or add --insecure.")


def enable_curve(context: zmq.Context, router: zmq.Socket, keys_dir: Path):
    """Make `router` a CURVE server that admits only the allowlisted client keys.

    Returns the running authenticator (stop it when the socket closes).
    """
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    secret_file = keys_dir / "server.key_secret"
    allowed = keys_dir / "authorized_clients"
    if not secret_file.is_file():
        raise ServerConfigError(f"There is no {secret_file}; create keys with `python -m "
                                f"backend keys {keys_dir}`.")
    if not allowed.is_dir() or not zmq.auth.load_certificates(allowed):
        raise ServerConfigError(f"{allowed} holds no client public keys; copy each "
                                "client's client.key there.")
    public, secret = zmq.auth.load_certificate(secret_file)
    authenticator = ThreadAuthenticator(context, log=log)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(allowed))
    router.curve_server = True
    router.curve_publickey = public
    router.curve_secretkey = secret
    return authenticator


def client_key(frame: zmq.Frame) -> str | None:
    """The CURVE client's public key (z85), as the authenticator set it on the message."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


def write_keys(keys_dir: Path) -> list[Path]:
    """Write a server and a client CURVE key pair plus the server's allowlist folder."""
    import zmq.auth

    keys_dir = Path(keys_dir)
    existing = [name for name in ("server.key_secret", "client.key_secret")
                if (keys_dir / name).exists()]
    if existing:
        raise ServerConfigError(f"{keys_dir} already holds keys ({existing[0]}); use another "
                                "folder or delete the old keys first.")
    keys_dir.mkdir(parents=True, exist_ok=True)
    server_public, server_secret = zmq.auth.create_certificates(keys_dir, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys_dir, "client")
    allowed = keys_dir / "authorized_clients"
    allowed.mkdir(exist_ok=True)
    shutil.copy(client_public, allowed / "client.key")
    for secret in (server_secret, client_secret):
        os.chmod(secret, 0o600)
    return [Path(server_public), Path(server_secret), Path(client_public), Path(client_secret),
            allowed / "client.key"]
