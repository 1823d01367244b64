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
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from psepr.channel import Channel, parse
from psepr.errors import ChannelError, ConfigError

INBOX = "_inbox"
_ENTRY_KEYS = frozenset(("key", "key_file", "send", "lease"))


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
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read ACL file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"ACL file {path} is not valid TOML: {exc}") from None
    principals: dict[str, Principal] = {}
    by_key: dict[str, str] = {}
    table = data.get("principals", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [principals] must be a table")
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: principals.{name} must be a table")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ConfigError(f"{path}: principals.{name}: unknown key(s) "
                              f"{', '.join(sorted(unknown))}; expected {', '.join(sorted(_ENTRY_KEYS))}")
        if not name or "/" in name or "*" in name or not name.isprintable() or " " in name:
            raise ConfigError(f"{path}: principal name {name!r} must be printable text without "
                              f"whitespace, '/' or '*'")
        key = entry.get("key")
        if key is None and "key_file" in entry:
            if not isinstance(entry["key_file"], str):
                raise ConfigError(f"{path}: principals.{name}.key_file must be a file name")
            import zmq.auth   # only to read pyzmq's certificate files; the ACL itself is pure
            key_path = (path.parent / entry["key_file"]).resolve()
            try:
                public, _ = zmq.auth.load_certificate(str(key_path))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path}: principals.{name}.key_file {key_path}: {exc}") from None
            key = public.decode("ascii")
        if key is not None:
            if not isinstance(key, str) or len(key) != 40:
                raise ConfigError(f"{path}: principals.{name}.key must be a 40-character Z85 "
                                  f"CURVE public key")
            if key in by_key:
                raise ConfigError(f"{path}: principals.{name} and principals.{by_key[key]} "
                                  f"share one key")
            by_key[key] = name
        principals[name] = Principal(name, key, _grants(path, name, "send", entry.get("send", [])),
                                     _grants(path, name, "lease", entry.get("lease", [])))
    return ACL(principals, by_key)
