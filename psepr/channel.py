"""Channels: hierarchical, rooted event addresses (PsEPR grammar).

Theory of operation
-------------------
A channel is written ``/authority/part/part/``: it begins and ends with ``/``
and its first element names the authority (by convention a domain name).
Elements are non-empty, printable UTF-8 without ``/``, whitespace or control
characters; ``*`` is reserved for future wildcards and so is refused.  The
root ``/`` is a valid *lease* target (it covers everything) but not an event
destination.

Covering is element-wise: ``/a/b/`` covers ``/a/b/`` and ``/a/b/c/`` but not
``/a/bc/``.  Because every channel text ends in ``/``, element-wise covering
is exactly ``child.text.startswith(parent.text)``; the router relies on that
and on :meth:`Channel.prefixes` (one dict look-up per depth level).

Channels are parsed once at the boundary (:func:`parse`) into an immutable
:class:`Channel`; code inside the product passes ``Channel`` values, never raw
strings.  Parsing is cached because the same channels recur constantly.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .errors import ChannelError

#: Longest accepted channel text, in UTF-8 bytes.
MAX_LENGTH = 1024
#: Deepest accepted channel (number of elements, authority included).
MAX_DEPTH = 32


class Channel:
    """An immutable, validated channel name.

    Attributes:
        text: the canonical text, e.g. ``"/example.com/heartbeat/"``.
        parts: the elements, e.g. ``("example.com", "heartbeat")``.
    """

    __slots__ = ("text", "parts", "_prefixes")

    def __init__(self, text: str, parts: tuple[str, ...]) -> None:
        # Private: use parse().  The arguments are trusted to be consistent.
        self.text = text
        self.parts = parts
        self._prefixes: tuple[str, ...] | None = None

    @property
    def authority(self) -> str | None:
        """The naming authority (first element), or None for the root."""
        return self.parts[0] if self.parts else None

    @property
    def depth(self) -> int:
        """Number of elements; 0 for the root ``/``."""
        return len(self.parts)

    @property
    def is_root(self) -> bool:
        return not self.parts

    @property
    def parent(self) -> "Channel | None":
        """The enclosing channel, or None for the root."""
        if not self.parts:
            return None
        return parse("/" + "".join(p + "/" for p in self.parts[:-1]))

    def child(self, *parts: str) -> "Channel":
        """Return a sub-channel.

        Args:
            *parts: elements to append; each must obey the element rules.

        Returns:
            The validated sub-channel.

        Raises:
            ChannelError: if an element is invalid or the result is too long/deep.
        """
        return parse(self.text + "".join(f"{p}/" for p in parts))

    def covers(self, other: "Channel") -> bool:
        """True if a lease on this channel receives events sent to ``other``.

        Args:
            other: the event's channel.
        """
        return other.text.startswith(self.text)

    def prefixes(self) -> tuple[str, ...]:
        """Texts of every channel covering this one, root first, self last."""
        if self._prefixes is None:
            acc = ["/"]
            cur = "/"
            for p in self.parts:
                cur = cur + p + "/"
                acc.append(cur)
            self._prefixes = tuple(acc)
        return self._prefixes

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Channel({self.text!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Channel):
            return self.text == other.text
        return NotImplemented

    def __lt__(self, other: "Channel") -> bool:
        return self.text < other.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __reduce__(self):
        return (parse, (self.text,))


def element_ok(name: object) -> bool:
    """True if ``name`` can stand as one channel element: printable text of 1 to
    1,024 characters without whitespace, '/' or '*'.

    The rule for a client's service and instance names, which become the elements
    of its inbox (``/<authority>/_inbox/<service>/<instance>/``): the router
    checks them in HELLO, and :class:`~psepr.config.ClientConfig` before connecting.
    """
    return (isinstance(name, str) and 0 < len(name) <= 1024 and name.isprintable()
            and not any(c.isspace() or c in "/*" for c in name))


def _check_element(text: str, element: str, index: int) -> None:
    if element == "":
        raise ChannelError(text, "empty-element",
                           f"element {index} is empty ('//' is reserved)")
    if "*" in element:
        raise ChannelError(text, "reserved-char",
                           f"element {index} {element!r} contains '*', which is reserved")
    for ch in element:
        if ch.isspace():
            raise ChannelError(text, "whitespace",
                               f"element {index} {element!r} contains whitespace {ch!r}")
        if not ch.isprintable():
            raise ChannelError(text, "control-char",
                               f"element {index} {element!r} contains a non-printable "
                               f"character U+{ord(ch):04X}")


#: An ASCII channel that obeys every rule: printable, no space, '/' or '*' in elements.
_ASCII_OK = re.compile(r"/(?:[!-)+-.0-~]+/)*")


@lru_cache(maxsize=65536)
def _parse_text(text: str) -> Channel:
    if text.isascii() and _ASCII_OK.fullmatch(text):
        # Fast path (the common case): only the bounds remain to be checked.
        if text == "/":
            return Channel("/", ())
        parts = tuple(text[1:-1].split("/"))
        if len(text) <= MAX_LENGTH and len(parts) <= MAX_DEPTH:
            return Channel(text, parts)
    return _parse_slow(text)


def _parse_slow(text: str) -> Channel:
    """Full check, rule by rule, so that the error names the rule broken."""
    if not text.startswith("/"):
        raise ChannelError(text, "rooted", "a channel must begin with '/'")
    if not text.endswith("/"):
        raise ChannelError(text, "trailing-slash", "a channel must end with '/'")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_LENGTH:
        raise ChannelError(text, "too-long", f"longer than {MAX_LENGTH} bytes")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChannelError(text, "utf-8", "not valid UTF-8 (lone surrogate)") from None
    if text == "/":
        return Channel("/", ())
    parts = tuple(text[1:-1].split("/"))
    if len(parts) > MAX_DEPTH:
        raise ChannelError(text, "too-deep", f"more than {MAX_DEPTH} elements")
    for i, element in enumerate(parts):
        _check_element(text, element, i)
    return Channel(text, parts)


def parse(text: "str | Channel") -> Channel:
    """Parse and validate a channel name.

    Args:
        text: the channel text, or an existing :class:`Channel` (returned as is).

    Returns:
        The validated :class:`Channel`.

    Raises:
        ChannelError: quoting the input and naming the rule it broke.
    """
    if isinstance(text, Channel):
        return text
    if not isinstance(text, str):
        raise ChannelError(text, "type", f"expected a string, got {type(text).__name__}")
    return _parse_text(text)


def parse_destination(text: "str | Channel") -> Channel:
    """Parse a channel that events are sent to: like :func:`parse`, but not the root.

    Raises:
        ChannelError: if invalid, or if it is the root ``/``.
    """
    ch = parse(text)
    if ch.is_root:
        raise ChannelError(ch.text, "send-root",
                           "events cannot be sent to the root '/'; name an authority")
    return ch


def covers(lease: "str | Channel", target: "str | Channel") -> bool:
    """Element-wise covering test on two channel names (parsed first).

    Raises:
        ChannelError: if either name is invalid.
    """
    return parse(lease).covers(parse(target))
