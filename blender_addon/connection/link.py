"""The connection to the backend: the shared client, CURVE keys, one-sentence errors.

The client lives in the project's `shared/` package. The built extension carries a
copy of it inside (`<extension>/shared/`); a development checkout imports the
project's own. Either way every failure leaves here as a UserError whose text is the
one sentence Blender shows, with the client's error code kept (`error.code`,
shared/errors.py ErrorCode) so a caller can tell one failure from another.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..rules.errors import UserError
from ..rules.server_hello import server_backbone
from ..vendored import shared_module


def client_api():
    """The `shared.client` module: the vendored copy, else the project's checkout."""
    return shared_module("client")


@dataclass(frozen=True)
class ServerConfig:
    """Where the server is and how to prove who we are (the add-on's preferences)."""

    address: str
    server_key_file: str = ""
    client_key_file: str = ""
    timeout_s: float = 10.0


def load_keys(config: ServerConfig) -> dict:
    """CURVE keys for the client: none for a local server, both files for a remote one.

    The server public key file is the server's `server.key`; the client key file is
    this client's `client.key_secret` (both from `python -m backend keys DIR`).
    """
    server_file, client_file = config.server_key_file.strip(), config.client_key_file.strip()
    if not server_file and not client_file:
        return {}
    if not (server_file and client_file):
        raise UserError("Set both the server public key file and the client secret key file "
                        "in the Understudy preferences, or neither for a local server.")
    return guarded(lambda: client_api().load_client_key_files(server_file, client_file))


_clients: dict[ServerConfig, object] = {}


def client_for(config: ServerConfig):
    """A connected client for this configuration, reused between calls."""
    if not config.address.strip():
        raise UserError("The server address is empty; set it in the Understudy preferences "
                        "(for example tcp://127.0.0.1:5555).")
    if config not in _clients:
        api = client_api()
        keys = load_keys(config)
        _clients[config] = guarded(lambda: api.Client(config.address.strip(),
                                                      timeout_s=config.timeout_s, **keys))
    return _clients[config]


def known_hello(config: ServerConfig) -> dict | None:
    """The server's last hello to this configuration's client, without asking (the panel
    draws from it); None before one was heard."""
    client = _clients.get(config)
    info = getattr(client, "server_info", None)
    return info if isinstance(info, dict) else None


def forget(config: ServerConfig) -> None:
    """Close and drop a client (after an error, so the next call reconnects)."""
    client = _clients.pop(config, None)
    if client is not None:
        try:
            client.close()
        except Exception:  # closing a broken socket must not raise further
            pass


def close_all() -> None:
    for config in list(_clients):
        forget(config)


def guarded(action):
    """Run a client call; turn its errors into UserError with one sentence (a client
    error's code kept)."""
    import zmq

    api = client_api()
    try:
        return action()
    except api.ClientError as error:
        raise UserError(str(error), error.code) from error
    except (OSError, zmq.ZMQError) as error:
        raise UserError(f"Talking to the Understudy server failed ({error}); check that it is "
                        f"running and the address in the preferences.") from error


def describe_server(hello: dict) -> str:
    """One line about the server for the "Test connection" report."""
    model = hello.get("model", "unknown model")
    device = hello.get("device", "unknown device")
    version = hello.get("v", "?")
    backbone = server_backbone(hello)
    if backbone:
        width, height = backbone["native_size"]
        model = (f"{model} ({backbone['name']}, {width}x{height}, "
                 f"{backbone['window_frames']}-frame windows)")
    return f"Connected: model {model} on {device}, protocol {version}."
