"""PsEPR-py: an event overlay for farms of machines.

The public API (see README.md)::

    import psepr
    with psepr.connect("tcp://127.0.0.1:7600") as con:
        lease = con.lease("/example.com/heartbeat/", duration=120, type="heartbeat")
        con.send("/example.com/heartbeat/x.example.com/", {"load": 0.4}, type="heartbeat")
        event = lease.receive(timeout=5.0)

``psepr.aio.connect`` offers the same API with ``await``; ``psepr.pldb.query``
asks PLDB for the tuples remembered on a channel.
"""

from . import errors
from ._version import VERSION as __version__
from .channel import Channel, covers, parse as channel
from .client import Connection, Lease, connect
from .config import ClientConfig, tune_gc
from .errors import (AccessDenied, AddressInUse, ChannelError, ClosedError, ConfigError,
                     ConnectionLost, EventError, LeaseExpired, NoMonitor, NoRoute, ProtocolError,
                     PseprError, RemoteError, SlowConsumer, StorageError, TimeoutError,
                     UsageError, XMLRefused)
from .event import ATTRIBUTE, EVENT_NS, Event, attribute, from_json, from_xml
from . import pldb

__all__ = [
    "connect", "Connection", "Lease", "ClientConfig", "tune_gc", "Event", "Channel", "channel", "covers",
    "attribute", "ATTRIBUTE", "EVENT_NS", "from_json", "from_xml", "errors", "aio",
    "PseprError", "UsageError", "ChannelError", "EventError", "XMLRefused", "ConfigError",
    "AddressInUse", "RemoteError", "AccessDenied", "ProtocolError", "LeaseExpired", "ClosedError",
    "ConnectionLost", "TimeoutError", "NoRoute", "NoMonitor", "SlowConsumer", "StorageError",
    "pldb", "__version__",
]


def __getattr__(name):
    if name == "aio":  # imported lazily: asyncio users only
        from . import aio
        return aio
    raise AttributeError(f"module 'psepr' has no attribute {name!r}")
