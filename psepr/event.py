"""Events and their two lossless encodings (JSON and PsEPR XML).

Theory of operation
-------------------
An :class:`Event` is addressed to a channel (optionally to one service or
instance inside it), comes from a service (the authenticated principal, which
the router stamps) and an instance, has a type (the payload's namespace), a
sender time and a payload.  A payload is either a JSON value
(``format == "json"``) or one XML element (``format == "xml"``) whose
namespace is the event type, e.g. ``<payload xmlns="heartbeat">..</payload>``.

Two whole-event encodings exist and convert into each other without loss:

* JSON: ``{"id", "to": {"channel", "service", "instance"}, "from": {"service",
  "instance"}, "type", "time", "reply_to", "re", "format", "payload"}``; an
  XML payload is carried as its text.
* PsEPR XML: ``<event xmlns="http://psepr.org/xs/event">`` with ``id``,
  ``time``, ``to``, ``from``, ``reply-to``, ``re`` and ``payload`` children; a
  JSON payload is carried as text in ``<payload xmlns="TYPE" format="json">``.

XML from outside is parsed only with defusedxml (no DTD, no entities, no
external references) and only below a size bound.  On the wire between SDK
and router the payload travels as opaque bytes (JSON text or XML text, see
:mod:`psepr.wire`); routers never look inside.  Events built from the wire
decode their payload lazily, on first access, so that a client that only
forwards or counts events does not pay for parsing.
"""

from __future__ import annotations

import itertools
import math
import os
import re as _re
import time as _time
import xml.etree.ElementTree as ET
from typing import Any

import defusedxml
import defusedxml.ElementTree as DET
import orjson

from .channel import Channel, parse, parse_destination
from .errors import EventError, XMLRefused

#: XML namespace of the PsEPR event envelope.
EVENT_NS = "http://psepr.org/xs/event"
#: Event type of PsEPR attribute payloads (field, value, expire).
ATTRIBUTE = "http://psepr.org/xs/payload/attribute"
#: Default bound on one event's encoded size (payload or whole document).
MAX_EVENT_BYTES = 1 << 20
#: Deepest element nesting accepted in XML (the whole document, envelope included).
#: ElementTree's serializer, like most code that walks a tree, recurses once per
#: level; Python stops at 1,000 frames, so one event nested deeper than that broke
#: every reader that printed or re-serialized it.  Real payloads nest a few levels.
MAX_XML_DEPTH = 256
#: Deepest nesting of a JSON payload (arrays and objects): the deepest orjson can
#: write inside an event's JSON encoding (it writes 254 levels at most, and the
#: event object is one).  orjson *reads* up to 1,024, so a payload between the two,
#: from a client that is not the SDK, could be received but neither printed nor
#: stored nor sent on: it ended `psepr lease` and stopped both PLDB monitors of
#: the local farm from storing or answering.  Real payloads nest a few levels.
MAX_JSON_DEPTH = 253
#: A payload shorter than this cannot nest deeper than MAX_JSON_DEPTH (each level
#: takes two bytes): only longer ones pay for :func:`check_json_depth`.
JSON_DEPTH_CHECK_BYTES = 2 * (MAX_JSON_DEPTH + 1)
#: What orjson's TypeError says of a value nested deeper than it writes.
ORJSON_TOO_DEEP = "Recursion limit reached"

JSON = "json"
XML = "xml"
_FORMATS = (JSON, XML)
_UNSET = object()


def _check_name(value: Any, field: str, optional: bool = True) -> str | None:
    """Names (ids, services, instances, types) are printable text without whitespace."""
    if value is None:
        if optional:
            return None
        raise EventError(f"event field {field!r} is required", field)
    if not isinstance(value, str) or not value:
        raise EventError(f"event field {field!r} must be a non-empty string, got {value!r}", field)
    if len(value) > 1024:
        raise EventError(f"event field {field!r} is longer than 1024 characters", field)
    for ch in value:
        if ch.isspace() or not ch.isprintable():
            raise EventError(f"event field {field!r} = {value!r} contains whitespace or a "
                             f"control character", field)
    return value


def _check_type(value: Any) -> str | None:
    """A type is a name that is also usable as an XML namespace (ElementTree: no '}')."""
    _check_name(value, "type")
    if value is not None and "}" in value:
        raise EventError(f"event type {value!r} contains '}}', which an XML namespace "
                         f"cannot hold", "type")
    return value


_id_prefix = os.urandom(6).hex()
_id_counter = itertools.count(1)


def new_id() -> str:
    """A process-unique event id (random per-process prefix + counter)."""
    return f"{_id_prefix}.{next(_id_counter)}"


class Event:
    """One event.  Equality compares every encoded field (not the delivering lease).

    Attributes:
        id: unique id chosen by the sender.
        channel: destination :class:`~psepr.channel.Channel`.
        type: payload namespace, or None.
        time: sender's wall-clock time, seconds since the epoch.
        format: ``"json"`` or ``"xml"``.
        payload: the JSON value, or the XML payload element as text.
        from_service: authenticated principal of the sender (router-stamped).
        from_instance: the sender connection's instance name (router-stamped).
        to_service / to_instance: directed delivery inside the channel, or None.
        reply_to: channel where replies go (request/reply), or None.
        re: id of the event this one answers, or None.
        leases: ids of the local leases this event was delivered on (SDK only).
    """

    __slots__ = ("id", "channel", "type", "time", "format", "_payload", "_raw", "_off", "_end",
                 "from_service", "from_instance", "to_service", "to_instance",
                 "reply_to", "re", "leases")

    def __init__(self, channel: "str | Channel", payload: Any = None, *, type: str | None = None,
                 format: str | None = None, id: str | None = None, time: float | None = None,
                 from_service: str | None = None, from_instance: str | None = None,
                 to_service: str | None = None, to_instance: str | None = None,
                 reply_to: "str | Channel | None" = None, re: str | None = None) -> None:
        """Build and validate an event.

        Args:
            channel: destination channel (not the root).
            payload: a JSON-serialisable value, or XML text when ``format="xml"``.
            type: the payload namespace; for XML payloads it defaults to the
                payload element's namespace and must agree with it.
            format: ``"json"`` (default) or ``"xml"``.
            id: event id; a fresh unique one by default.
            time: sender time; now by default.
            from_service, from_instance: normally left None (the router stamps them).
            to_service, to_instance: directed delivery.
            reply_to: reply channel for requests.
            re: id of the request this event answers.

        Raises:
            ChannelError: invalid channel or reply_to.
            EventError: invalid field, payload not serialisable, type mismatch.
            XMLRefused: XML payload refused by the hardened parser.
        """
        self.channel = parse_destination(channel)
        fmt = format or JSON
        if fmt not in _FORMATS:
            raise EventError(f"event format must be 'json' or 'xml', got {fmt!r}", "format")
        self.format = fmt
        if fmt == XML:
            self._payload, type = xml_payload_and_type(payload, type)
        else:
            self._payload = payload
        # Encoded payload: _raw[_off:_end].  A received event points into the
        # message body it came in (no copy until the payload is first used).
        self._raw = None
        self._off = self._end = 0
        self.type = _check_type(type)
        self.id = _check_name(id, "id") if id is not None else new_id()
        if time is None:
            time = _time.time()
        if (isinstance(time, bool) or not isinstance(time, (int, float))
                or not math.isfinite(time)):
            raise EventError(f"event time must be a finite number, got {time!r}", "time")
        self.time = float(time)
        self.from_service = _check_name(from_service, "from.service")
        self.from_instance = _check_name(from_instance, "from.instance")
        self.to_service = _check_name(to_service, "to.service")
        self.to_instance = _check_name(to_instance, "to.instance")
        self.reply_to = parse(reply_to) if reply_to is not None else None
        self.re = _check_name(re, "re")
        self.leases: tuple = ()

    @property
    def payload(self) -> Any:
        """The payload: a JSON value, or the XML payload element as text."""
        p = self._payload
        if p is _UNSET:
            raw = self._raw[self._off:self._end]
            if self.format == JSON:
                try:
                    p = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise EventError(f"event {self.id}: payload is not valid JSON: {exc}",
                                     "payload") from None
                if len(raw) >= JSON_DEPTH_CHECK_BYTES:
                    check_json_depth(p, f"event {self.id}")
            else:
                p = bytes(raw).decode("utf-8", "replace")
            self._payload = p
        return p

    def payload_bytes(self) -> bytes:
        """The payload as it travels on the wire (JSON text or XML text, UTF-8).

        Raises:
            EventError: if a JSON payload cannot be serialised.
        """
        if self._raw is not None:
            return bytes(self._raw[self._off:self._end])
        if self.format == JSON:
            try:
                raw = orjson.dumps(self._payload)
            except TypeError as exc:
                raise EventError(f"payload is not JSON-serialisable: {exc}", "payload") from None
        else:
            raw = self._payload.encode("utf-8")
        self._raw, self._off, self._end = raw, 0, len(raw)
        return raw

    def xml_element(self) -> ET.Element:
        """Parse an XML payload (hardened) into an ElementTree element.

        Raises:
            EventError: if the payload is JSON.
            XMLRefused: if the payload is not acceptable XML.
        """
        if self.format != XML:
            raise EventError(f"event {self.id} has a JSON payload, not XML", "payload")
        return parse_xml(self.payload)

    # -- equality ----------------------------------------------------------
    def _key(self) -> tuple:
        payload = self.payload
        if self.format == XML:
            payload = _canonical(payload)
        else:
            payload = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        return (self.id, self.channel.text, self.type, self.time, self.format, payload,
                self.from_service, self.from_instance, self.to_service, self.to_instance,
                self.reply_to.text if self.reply_to else None, self.re)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # mutable-ish payload; events are not dict keys

    def __repr__(self) -> str:
        return (f"Event(id={self.id!r}, channel={self.channel.text!r}, type={self.type!r}, "
                f"from={self.from_service!r}/{self.from_instance!r}, payload={self.payload!r})")

    # -- codecs ------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON encoding as a Python dict (see module docs for the shape)."""
        return {
            "id": self.id,
            "to": {"channel": self.channel.text, "service": self.to_service,
                   "instance": self.to_instance},
            "from": {"service": self.from_service, "instance": self.from_instance},
            "type": self.type,
            "time": self.time,
            "reply_to": self.reply_to.text if self.reply_to else None,
            "re": self.re,
            "format": self.format,
            "payload": self.payload,
        }

    def to_json(self) -> bytes:
        """Encode the whole event as JSON (UTF-8 bytes)."""
        return orjson.dumps(self.to_dict())

    def to_xml(self) -> str:
        """Encode the whole event as a PsEPR XML document (text)."""
        e = _xml_escape
        parts = [f'<event xmlns="{EVENT_NS}">', f"<id>{e(self.id)}</id>",
                 f"<time>{self.time!r}</time>", "<to>", f"<channel>{e(self.channel.text)}</channel>"]
        if self.to_service is not None:
            parts.append(f"<service>{e(self.to_service)}</service>")
        if self.to_instance is not None:
            parts.append(f"<instance>{e(self.to_instance)}</instance>")
        parts.append("</to><from>")
        if self.from_service is not None:
            parts.append(f"<service>{e(self.from_service)}</service>")
        if self.from_instance is not None:
            parts.append(f"<instance>{e(self.from_instance)}</instance>")
        parts.append("</from>")
        if self.reply_to is not None:
            parts.append(f"<reply-to>{e(self.reply_to.text)}</reply-to>")
        if self.re is not None:
            parts.append(f"<re>{e(self.re)}</re>")
        if self.format == XML:
            # Re-serialised, not pasted: an element of the payload without a namespace
            # would otherwise inherit the event namespace (explicit xmlns="" instead).
            parts.append(_serialize_payload(parse_xml(self.payload)))
        else:
            ns = _xml_escape_attr(self.type) if self.type is not None else ""
            # U+FFFE/U+FFFF are legal in JSON strings but not in XML: escape them
            # the JSON way so that the document stays well-formed.
            text = orjson.dumps(self.payload).decode()
            text = text.replace("\ufffe", "\\ufffe").replace("\uffff", "\\uffff")
            parts.append(f'<payload xmlns="{ns}" format="json">{e(text)}</payload>')
        parts.append("</event>")
        return "".join(parts)


#: Longest attribute field name, in characters.
MAX_FIELD_CHARS = 256


def attribute_problem(field: Any, expire: Any) -> tuple[str, str] | None:
    """What is wrong with an attribute's ``field`` or ``expire``: the one rule that
    :func:`attribute` and every PLDB monitor apply.

    A field is a name people read one per line (``psepr pldb get``) and ask for
    by name, so it must be printable text; an expiry is a finite number of
    seconds (JSON has no infinity: null means "never").

    Returns:
        ``(key, message)`` naming the first problem, or None if both are fine.
    """
    if type(field) is not str or not field or len(field) > MAX_FIELD_CHARS \
            or not field.isprintable():
        return "field", (f"field must be a non-empty string of at most {MAX_FIELD_CHARS} "
                         f"printable characters, got {field!r:.80}")
    if expire is not None and (isinstance(expire, bool) or not isinstance(expire, (int, float))
                               or not expire >= 0 or expire == math.inf):
        return "expire", (f"expire must be a non-negative number of seconds or null (never), "
                          f"got {expire!r:.40}")
    return None


def attribute(field: str, value: Any, expire: float | None = None) -> dict:
    """Build a PsEPR attribute payload (send it with ``type=psepr.ATTRIBUTE``).

    Args:
        field: attribute name, e.g. ``"load_avg"``.
        value: any JSON value.
        expire: seconds after which the value is stale, or None for never.

    Returns:
        ``{"field": field, "value": value, "expire": expire}``

    Raises:
        EventError: the field is not a name a monitor takes (see
            :func:`attribute_problem`), or expire is not a finite non-negative number.
    """
    problem = attribute_problem(field, expire)
    if problem is not None:
        raise EventError(f"attribute {problem[1]}", problem[0])
    return {"field": field, "value": value, "expire": expire}


# -- XML helpers -------------------------------------------------------------

def _xml_escape(text: str) -> str:
    # A raw CR would be read back as LF (XML end-of-line handling): keep it a reference.
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\r", "&#13;"))


def _xml_escape_attr(text: str) -> str:
    # Raw tabs and newlines in attribute values are read back as spaces.
    return (_xml_escape(text).replace('"', "&quot;").replace("\n", "&#10;")
            .replace("\t", "&#9;"))


#: ``<?xml ...?>`` at the start of a payload: legal alone, illegal inside an event.
_XML_DECL = _re.compile(r"^\ufeff?\s*<\?xml\s[^>]*\?>")
#: The namespace bound to the reserved ``xml`` prefix (never declared).
_XML_NS = "http://www.w3.org/XML/1998/namespace"


def parse_xml(data: "str | bytes", max_bytes: int = MAX_EVENT_BYTES) -> ET.Element:
    """Parse untrusted XML with the hardened parser.

    Args:
        data: the document text or bytes.
        max_bytes: refuse documents larger than this.

    Returns:
        The root element.

    Raises:
        XMLRefused: for a DTD, an entity, an external reference, a syntax error,
            text that cannot be UTF-8 (a lone surrogate), a document above
            ``max_bytes`` or elements nested deeper than ``MAX_XML_DEPTH``; the
            message says which.
    """
    if isinstance(data, str):
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError as exc:
            # A lone surrogate: what Python makes of bytes that were not UTF-8
            # (stdin, argv, a file read with errors="surrogateescape").
            raise XMLRefused(f"XML refused: character {exc.start} ({data[exc.start]!r}) is not "
                             f"text: was the input UTF-8?", "payload") from None
    else:
        size = len(data)
    if size > max_bytes:
        raise XMLRefused(f"XML document of {size} bytes exceeds the limit of {max_bytes} bytes",
                         "payload")
    try:
        root = DET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DTDForbidden:
        raise XMLRefused("XML refused: documents with a DTD (<!DOCTYPE>) are not accepted",
                         "payload") from None
    except defusedxml.EntitiesForbidden:
        raise XMLRefused("XML refused: entity declarations are not accepted", "payload") from None
    except defusedxml.ExternalReferenceForbidden:
        raise XMLRefused("XML refused: external references are not accepted", "payload") from None
    except ET.ParseError as exc:
        raise XMLRefused(f"XML refused: not well-formed: {exc}", "payload") from None
    # Level by level, without recursion (the point is to refuse what recursion breaks on).
    level, depth = [root], 1
    while (level := [child for el in level for child in el]):
        depth += 1
        if depth > MAX_XML_DEPTH:
            raise XMLRefused(f"XML refused: elements nested more than {MAX_XML_DEPTH} levels "
                             f"deep", "payload")
    return root


def _split_tag(tag: str) -> tuple[str | None, str]:
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return (ns or None), local
    return None, tag


def check_xml_payload(payload: Any, max_bytes: int = MAX_EVENT_BYTES) -> tuple[str, str | None]:
    """Validate an XML payload: one ``payload`` element, hardened-parsed.

    Args:
        payload: the XML text (str or bytes).
        max_bytes: size bound.

    Returns:
        ``(text, namespace)``: the payload text and its namespace (the type).

    Raises:
        EventError, XMLRefused: if it is not text, not acceptable XML, or its
            root element is not ``payload``.
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise XMLRefused(f"XML refused: payload bytes are not UTF-8: {exc}",
                             "payload") from None
    if not isinstance(payload, str):
        raise EventError(f"an XML payload must be text, got {type(payload).__name__}", "payload")
    root = parse_xml(payload, max_bytes)
    ns, local = _split_tag(root.tag)
    if local != "payload":
        raise EventError(f"the XML payload's root element must be <payload>, got <{local}>",
                         "payload")
    if "format" in root.attrib:
        # Reserved: <payload format="json"> marks a JSON payload in the XML encoding.
        raise EventError("the XML payload's root may not carry a 'format' attribute (reserved)",
                         "payload")
    return _XML_DECL.sub("", payload).strip(), ns


def xml_payload_and_type(payload: Any, type: str | None,
                         max_bytes: int = MAX_EVENT_BYTES) -> tuple[str, str | None]:
    """Check an XML payload and reconcile it with the event type.

    Args:
        payload: the XML payload text.
        type: the type the caller gave, or None to take the payload's namespace.
        max_bytes: size bound.

    Returns:
        ``(text, type)``.

    Raises:
        EventError, XMLRefused: bad XML, or a type that differs from the namespace.
    """
    text, ns = check_xml_payload(payload, max_bytes)
    if type is None:
        type = ns
    elif type != ns:
        raise EventError(f"XML payload namespace {ns!r} does not match type {type!r}", "type")
    return text, type


def _serialize_payload(elem: ET.Element) -> str:
    """Serialize a parsed payload element using default namespaces (no ns0 prefixes)."""
    out: list[str] = []

    def walk(el: ET.Element, inherited: str | None) -> None:
        ns, local = _split_tag(el.tag)
        attrs = ""
        if ns != inherited:
            attrs += f' xmlns="{_xml_escape_attr(ns or "")}"'
        extra = {}
        for k, v in el.attrib.items():
            ans, alocal = _split_tag(k)
            if ans is None:
                attrs += f' {alocal}="{_xml_escape_attr(v)}"'
            elif ans == _XML_NS:
                attrs += f' xml:{alocal}="{_xml_escape_attr(v)}"'
            else:
                prefix = extra.setdefault(ans, f"a{len(extra)}")
                attrs += f' {prefix}:{alocal}="{_xml_escape_attr(v)}"'
        for ans, prefix in extra.items():
            attrs += f' xmlns:{prefix}="{_xml_escape_attr(ans)}"'
        out.append(f"<{local}{attrs}>")
        if el.text:
            out.append(_xml_escape(el.text))
        for child in el:
            walk(child, ns)
            if child.tail:
                out.append(_xml_escape(child.tail))
        out.append(f"</{local}>")

    walk(elem, EVENT_NS)
    return "".join(out)


def _canonical(text: str) -> str:
    return ET.canonicalize(xml_data=text, rewrite_prefixes=True)


def _child_text(parent: ET.Element, name: str) -> str | None:
    el = parent.find(f"{{{EVENT_NS}}}{name}")
    if el is None:
        return None
    return el.text or ""


def check_json_depth(value: Any, what: str) -> None:
    """Refuse a JSON value that nests deeper than ``MAX_JSON_DEPTH`` levels.

    The test is orjson's own writer, one level down (an iterative walk in Python
    costs three times as much).  Callers skip it for values whose encoding is
    shorter than ``JSON_DEPTH_CHECK_BYTES``.

    Args:
        value: the value (one orjson cannot write for another reason, a set say,
            passes: whoever sends it is told why).
        what: names the value in the error (``"event <id>"``).

    Raises:
        EventError: it nests too deep (names ``what``).
    """
    try:
        orjson.dumps([value])
    except TypeError as exc:
        if str(exc) == ORJSON_TOO_DEEP:
            raise EventError(f"{what}: JSON payload nested more than {MAX_JSON_DEPTH} levels "
                             f"(refused)", "payload") from None


def from_xml(data: "str | bytes", max_bytes: int = MAX_EVENT_BYTES) -> Event:
    """Decode a PsEPR XML event document.

    Args:
        data: the document.
        max_bytes: size bound (default 1 MiB).

    Returns:
        The :class:`Event`.

    Raises:
        XMLRefused: hostile or malformed XML, or too large.
        EventError, ChannelError: a required field is missing or invalid.
    """
    root = parse_xml(data, max_bytes)
    if root.tag != f"{{{EVENT_NS}}}event":
        raise EventError(f"root element must be <event xmlns=\"{EVENT_NS}\">, got {root.tag}",
                         "event")
    to = root.find(f"{{{EVENT_NS}}}to")
    if to is None or _child_text(to, "channel") is None:
        raise EventError("XML event has no <to><channel>", "to.channel")
    frm = root.find(f"{{{EVENT_NS}}}from")
    payload = None
    for child in root:
        if _split_tag(child.tag)[1] == "payload":
            payload = child
    if payload is None:
        raise EventError("XML event has no <payload>", "payload")
    ns, _ = _split_tag(payload.tag)
    time_text = _child_text(root, "time")
    try:
        t = float(time_text) if time_text is not None else None
    except ValueError:
        raise EventError(f"XML event <time> is not a number: {time_text!r}", "time") from None
    common = dict(
        id=_child_text(root, "id"), time=t,
        to_service=_child_text(to, "service"), to_instance=_child_text(to, "instance"),
        from_service=_child_text(frm, "service") if frm is not None else None,
        from_instance=_child_text(frm, "instance") if frm is not None else None,
        reply_to=_child_text(root, "reply-to"), re=_child_text(root, "re"))
    channel = _child_text(to, "channel")
    if payload.get("format") == "json":
        try:
            value = orjson.loads(payload.text or "null")
        except orjson.JSONDecodeError as exc:
            raise EventError(f"JSON payload inside XML event is invalid: {exc}",
                             "payload") from None
        if len(payload.text or "") >= JSON_DEPTH_CHECK_BYTES:
            check_json_depth(value, "XML event")
        return Event(channel, value, type=ns, format=JSON, **common)
    return Event(channel, _serialize_payload(payload), type=ns, format=XML, **common)


def from_json(data: "str | bytes | dict", max_bytes: int = MAX_EVENT_BYTES) -> Event:
    """Decode the JSON encoding of an event.

    Args:
        data: JSON text/bytes, or an already-decoded dict.
        max_bytes: size bound (default 1 MiB).

    Returns:
        The :class:`Event`.

    Raises:
        EventError, ChannelError: malformed JSON, missing or invalid fields.
    """
    size = None
    if isinstance(data, (str, bytes)):
        size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
        if size > max_bytes:
            raise EventError(f"JSON event of {size} bytes exceeds the limit of "
                             f"{max_bytes} bytes", "event")
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise EventError(f"event is not valid JSON: {exc}", "event") from None
    if not isinstance(data, dict):
        raise EventError("a JSON event must be an object", "event")
    to = data.get("to") or {}
    frm = data.get("from") or {}
    if not isinstance(to, dict) or not isinstance(frm, dict):
        raise EventError("event 'to' and 'from' must be objects", "to")
    if "channel" not in to:
        raise EventError("JSON event has no to.channel", "to.channel")
    if size is None or size >= JSON_DEPTH_CHECK_BYTES:
        check_json_depth(data.get("payload"), "JSON event")
    return Event(to["channel"], data.get("payload"), type=data.get("type"),
                 format=data.get("format") or JSON, id=data.get("id"), time=data.get("time"),
                 from_service=frm.get("service"), from_instance=frm.get("instance"),
                 to_service=to.get("service"), to_instance=to.get("instance"),
                 reply_to=data.get("reply_to"), re=data.get("re"))
