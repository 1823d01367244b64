"""Pieces shared by the sync and asyncio shells (argument handling, keys)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import zmq
import zmq.auth

from .config import ClientConfig
from .errors import ConfigError

#: Longest wait in close() for events already sent to reach the router.
CLOSE_FLUSH = 2.0


def _z85_key(value: "str | bytes | Path", what: str, secret: bool = False) -> str:
    """Accept a Z85 key or a certificate file path; return the Z85 key."""
    if isinstance(value, bytes):
        value = value.decode("ascii")
    text = str(value)
    if len(text) == 40 and not Path(text).exists():
        return text
    try:
        public, sec = zmq.auth.load_certificate(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load {what} from {text}: {exc}") from None
    key = sec if secret else public
    if key is None:
        raise ConfigError(f"{text} has no secret key; pass the .key_secret file for {what}")
    return key.decode("ascii")


def build_config(config: ClientConfig | None, preset: str | None, service: str | None,
                 instance: str | None, keyfile: "str | Path | None",
                 server_key: "str | Path | None") -> ClientConfig:
    """Merge ``connect()`` keyword arguments into a :class:`ClientConfig`.

    Raises:
        ConfigError: unknown preset, a config that is not a ClientConfig, a bad
            service or instance name, unreadable key files, only one of
            keyfile/server_key.
    """
    if config is not None and not isinstance(config, ClientConfig):
        raise ConfigError(f"config= must be a psepr.ClientConfig, got {type(config).__name__}")
    if config is None:
        try:
            config = ClientConfig.preset(preset or "lan")
        except KeyError:
            raise ConfigError(f"unknown client preset {preset!r}; choose from "
                              f"{', '.join(ClientConfig.PRESETS)}") from None
    changes = {}
    if service is not None:
        changes["service"] = service
    if instance is not None:
        changes["instance"] = instance
    if (keyfile is None) != (server_key is None):
        raise ConfigError("CURVE needs both keyfile= (this client's .key_secret file) and "
                          "server_key= (the router's public key or .key file)")
    if keyfile is not None:
        changes["curve_secret_key"] = _z85_key(keyfile, "the client secret key", secret=True)
        changes["curve_public_key"] = _z85_key(keyfile, "the client public key")
        changes["curve_server_key"] = _z85_key(server_key, "the router's public key")
    return config.replace(**changes) if changes else config


def configure_socket(sock: zmq.Socket, config: ClientConfig) -> None:
    """Options every client DEALER socket gets."""
    sock.setsockopt(zmq.LINGER, 0)
    # IMMEDIATE: never queue to a peer that is not connected; unsent events stay
    # in the session buffer and survive a switch to another router.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.RCVHWM, 1000)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if config.curve_server_key:
        sock.curve_serverkey = config.curve_server_key.encode("ascii")
        sock.curve_publickey = config.curve_public_key.encode("ascii")
        sock.curve_secretkey = config.curve_secret_key.encode("ascii")


_monitors = itertools.count(1)


def monitor_socket(sock: zmq.Socket, events: int) -> zmq.Socket:
    """A PAIR socket that receives ``sock``'s connection events (``zmq_socket_monitor``).

    pyzmq's default monitor address is ``inproc://monitor.s-<FD>``; a closed
    socket's endpoint stays bound until ZeroMQ's reaper thread gets to it, so a
    new socket that reuses the file descriptor at once (a reconnect, the next
    connection) failed with EADDRINUSE.  Each monitor here gets its own address.

    Raises:
        zmq.ZMQError: ZeroMQ could not set up the monitor.
    """
    return sock.get_monitor_socket(events, f"inproc://psepr-monitor-{os.getpid()}-"
                                           f"{next(_monitors)}")


#: The connection events both shells watch: the handshake done (the WELCOME clock
#: starts), refused (say why at once, and try the next router), the connection gone.
MONITOR_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def handshake_failure(event: int, value: int, curve: bool) -> str | None:
    """Why ZeroMQ's handshake with a router failed, in words that suggest the fix.

    Args:
        event: a monitor event.
        value: its value (the ZAP status code, the protocol error, or an errno).
        curve: whether this client uses CURVE.

    Returns:
        The reason, or None if ``event`` is not a handshake failure.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the router refused this client's CURVE key (ZAP status {value}): is its "
                f"public key in the router's ACL?")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return ("the router and this client disagree on CURVE: one uses it, the other "
                    "not (a --curve router needs --key and --server-key)")
        return f"the ZeroMQ handshake failed (protocol error {value:#x})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        cause = os.strerror(value) if value > 0 else value      # an errno, all ZeroMQ says
        if curve:
            return (f"the CURVE handshake failed ({cause}): is --server-key this router's "
                    f"public key, and this client's key in its ACL?")
        # A --curve router that closes on a plain client before the client reads why
        # (a race: the mismatch above, or this) leaves only the errno.
        return (f"the ZeroMQ handshake failed ({cause}): a --curve router needs --key and "
                f"--server-key")
    return None


def inbox_channel(authority: str, principal: str, instance: str) -> str:
    """The private inbox of one connection (see registry.acl for its implicit grant)."""
    return f"/{authority}/_inbox/{principal}/{instance}/"
