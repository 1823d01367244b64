"""Access control: which principal may send to / lease which channels (pure core).

Theory of operation
-------------------
With CURVE, a client is known by its public key.  The ACL file (TOML) binds
keys to principal names and grants each principal ``send`` and ``lease`` on
channel prefixes (a grant on ``/a/`` covers ``/a/b/``, element-wise)::

    [principals.sensor]
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"   # or key_file = "keys/sensor.key"
    send = ["/example.com/node/"]
    lease = ["/example.com/"]

Implicit grants, so that request/reply works under any ACL: every principal
may lease its own inboxes ``/<authority>/_inbox/<principal>/...`` and may send
to any channel whose second element is ``_inbox`` (replies).

Peer routers are listed apart; when the ``[routers]`` table exists a router
accepts peer links only from the routers it names (with CURVE, only from the
key listed for that name), and dials a peer's ``endpoint`` trusting only its
listed key::

    [routers.r2]
    key_file = "keys/r2.key"
    endpoint = "tcp://10.0.0.2:7601"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from psepr.channel import Channel, element_ok, parse
from psepr.config import read_text_file
from psepr.errors import ChannelError, ConfigError
from psepr.wire import ROUTER_SERVICE

INBOX = "_inbox"
_ENTRY_KEYS = frozenset(("key", "key_file", "send", "lease"))
_ROUTER_KEYS = frozenset(("key", "key_file", "endpoint"))


@dataclass(frozen=True)
class PeerRouter:
    """A peer router the ACL knows: its name, CURVE public key and peer endpoint."""

    name: str
    key: str | None = None
    endpoint: str | None = None


@dataclass(frozen=True)
class Principal:
    """A named identity with its grants.

    Attributes:
        name: the principal (stamped as ``from.service``).
        key: the Z85 CURVE public key, or None.
        send: channel prefixes it may send to.
        lease: channel prefixes it may lease.
    """

    name: str
    key: str | None = None
    send: tuple[Channel, ...] = ()
    lease: tuple[Channel, ...] = ()


@dataclass(frozen=True)
class ACL:
    """The whole access-control list.

    Attributes:
        principals: by name.
        by_key: principal name by Z85 public key.
    """

    principals: dict[str, Principal] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    routers: dict[str, PeerRouter] = field(default_factory=dict)

    def peer_allowed(self, name: str, principal: str | None) -> bool:
        """May router ``name`` (authenticated as ``principal``, if CURVE) peer with us?

        Without a ``[routers]`` table any peer may (CURVE still admits only
        listed keys); with one, only the routers it names, each with its key.
        """
        if not self.routers:
            return True
        return name in self.routers and (principal is None or principal == name)

    def router_key_for(self, endpoint: str) -> str | None:
        """The listed public key of the router whose peer endpoint is ``endpoint``."""
        for r in self.routers.values():
            if r.endpoint == endpoint:
                return r.key
        return None

    def may_send(self, principal: str, channel: Channel) -> bool:
        """True if ``principal`` may send events to ``channel``."""
        if len(channel.parts) >= 2 and channel.parts[1] == INBOX:
            return True
        p = self.principals.get(principal)
        return p is not None and any(g.covers(channel) for g in p.send)

    def may_lease(self, principal: str, channel: Channel) -> bool:
        """True if ``principal`` may lease ``channel``."""
        parts = channel.parts
        if len(parts) >= 3 and parts[1] == INBOX and parts[2] == principal:
            return True
        p = self.principals.get(principal)
        return p is not None and any(g.covers(channel) for g in p.lease)


def _grants(path: str, name: str, kind: str, values) -> tuple[Channel, ...]:
    if not isinstance(values, list):
        raise ConfigError(f"{path}: principals.{name}.{kind} must be a list of channels")
    out = []
    for v in values:
        try:
            out.append(parse(v))
        except ChannelError as exc:
            raise ConfigError(f"{path}: principals.{name}.{kind}: {exc}") from None
    return tuple(out)


def load_acl(path: "str | Path") -> ACL:
    """Read an ACL file.

    Args:
        path: the TOML file.

    Returns:
        The :class:`ACL`.

    Raises:
        ConfigError: unreadable file, bad TOML, bad channel, missing or duplicate key;
            the message names the file and the entry.
    """
    path = Path(path)
    try:
        data = tomllib.loads(read_text_file(path, "ACL file"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"ACL file {path} is not valid TOML: {exc}") from None
    principals: dict[str, Principal] = {}
    by_key: dict[str, str] = {}
    routers: dict[str, PeerRouter] = {}
    key_owner: dict[str, str] = {}     # key -> "section.name", for messages
    for section, allowed in (("principals", _ENTRY_KEYS), ("routers", _ROUTER_KEYS)):
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        for name, entry in table.items():
            where = f"{path}: {section}.{name}"
            if not isinstance(entry, dict):
                raise ConfigError(f"{where} must be a table")
            unknown = set(entry) - allowed
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                                  f"expected {', '.join(sorted(allowed))}")
            if not element_ok(name):
                raise ConfigError(f"{path}: {section[:-1]} name {name!r} must be printable "
                                  f"text without whitespace, '/' or '*'")
            if section == "principals" and name == ROUTER_SERVICE:
                raise ConfigError(f"{path}: principal name {name!r} is reserved for the "
                                  f"routers' own events")
            key = _key(path, where, entry)
            if key is not None:
                if key in by_key and by_key[key] != name:
                    raise ConfigError(f"{where} and {key_owner[key]} share one key")
                by_key[key] = name
                key_owner[key] = f"{section}.{name}"
            if section == "principals":
                principals[name] = Principal(name, key,
                                             _grants(path, name, "send", entry.get("send", [])),
                                             _grants(path, name, "lease", entry.get("lease", [])))
            else:
                endpoint = entry.get("endpoint")
                if endpoint is not None and not isinstance(endpoint, str):
                    raise ConfigError(f"{where}.endpoint must be a ZeroMQ endpoint string")
                routers[name] = PeerRouter(name, key, endpoint)
    return ACL(principals, by_key, routers)


def _key(path: Path, where: str, entry: dict) -> str | None:
    """The Z85 public key of an entry (``key``, or read from ``key_file``), or None."""
    key = entry.get("key")
    if key is None and "key_file" in entry:
        if not isinstance(entry["key_file"], str):
            raise ConfigError(f"{where}.key_file must be a file name")
        import zmq.auth   # only to read pyzmq's certificate files; the ACL itself is pure
        key_path = (path.parent / entry["key_file"]).resolve()
        try:
            public, _ = zmq.auth.load_certificate(str(key_path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}.key_file {key_path}: {exc}") from None
        key = public.decode("ascii")
    if key is not None and (not isinstance(key, str) or len(key) != 40):
        raise ConfigError(f"{where}.key must be a 40-character Z85 CURVE public key")
    return key
