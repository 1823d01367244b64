"""Events, their JSON and PsEPR-XML encodings, and the hardened XML parser (issue 2, acceptance 2).

Proves that:

* JSON -> XML -> JSON and XML -> JSON -> XML are lossless (hypothesis), for
  events with JSON payloads (nested objects/lists, text, 64-bit integers,
  finite floats, booleans, null) and with XML payloads built from generated
  element trees in a namespace, with every optional field present or absent;
* the envelope has the documented shape (namespace ``http://psepr.org/xs/event``,
  payload namespace = event type) and the :func:`attribute` helper builds and
  checks PsEPR attribute payloads;
* hostile XML is refused with :class:`XMLRefused` saying why: a DTD, a
  billion-laughs entity bomb, an external entity (``file:///etc/passwd`` never
  leaks), documents above the size bound (1 MiB by default, configurable),
  malformed XML, a non-``<payload>`` root, a type/namespace mismatch;
* :func:`psepr.session.make_entry` encodes SEND entries and refuses bad input
  with the precise error (field named).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import psepr
from psepr import wire
from psepr.errors import ChannelError, EventError, XMLRefused
from psepr.event import (ATTRIBUTE, EVENT_NS, MAX_EVENT_BYTES, MAX_XML_DEPTH, Event, attribute,
                         check_xml_payload, from_json, from_xml, parse_xml)
from psepr.session import make_entry

# -- strategies ----------------------------------------------------------------------

_PRINTABLE = dict(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))
#: Names (ids, services, instances, types): printable text without whitespace.
NAMES = st.text(st.characters(**_PRINTABLE), min_size=1, max_size=12)
ELEMENTS = st.text(st.characters(**_PRINTABLE, exclude_characters="/*"), min_size=1,
                   max_size=6)
CHANNELS = st.lists(ELEMENTS, min_size=1, max_size=4).map(
    lambda parts: "/" + "".join(p + "/" for p in parts))
REPLY_CHANNELS = st.one_of(st.just("/"), CHANNELS)
#: Types: names usable as an XML namespace (no '}'; the reserved namespace names are not).
TYPES = st.text(st.characters(**_PRINTABLE, exclude_characters="}"), min_size=1,
                max_size=12).filter(lambda t: t not in ("http://www.w3.org/XML/1998/namespace",
                                                        "http://www.w3.org/2000/xmlns/"))
TIMES = st.floats(allow_nan=False, allow_infinity=False)

JSON_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 63 - 1) | TIMES | JSON_TEXT,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(JSON_TEXT, kids, max_size=4),
    max_leaves=12)

# XML character data: anything XML 1.0 allows (controls only as tab/newline/CR).
XML_TEXT = st.text(st.characters(exclude_categories=("Cs",),
                                 exclude_characters="".join(
                                     chr(c) for c in range(32) if c not in (9, 10, 13))
                                 + "\ufffe\uffff"), max_size=10)
XML_NAMESPACES = st.sampled_from(["urn:x", "heartbeat", "http://example.com/ns/load",
                                  "http://psepr.org/xs/payload/attribute"])
LOCAL_NAMES = st.sampled_from(["a", "b", "item", "load", "value"])
ATTR_NAMES = st.sampled_from(["x", "y", "id", "unit"])


def _esc_text(s: str) -> str:
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\r", "&#13;"))


def _esc_attr(s: str) -> str:
    return (_esc_text(s).replace('"', "&quot;").replace("\n", "&#10;")
            .replace("\t", "&#9;"))


@st.composite
def xml_elements(draw, depth=0):
    """XML text of one element (no namespace declaration of its own unless drawn)."""
    name = draw(LOCAL_NAMES)
    attrs = draw(st.dictionaries(ATTR_NAMES, XML_TEXT, max_size=2))
    own_ns = draw(st.one_of(st.none(), st.just(""), XML_NAMESPACES))
    head = name + (f' xmlns="{own_ns}"' if own_ns is not None else "")
    head += "".join(f' {k}="{_esc_attr(v)}"' for k, v in attrs.items())
    body = _esc_text(draw(XML_TEXT))
    if depth < 2:
        for kid in draw(st.lists(xml_elements(depth + 1), max_size=3)):
            body += kid + _esc_text(draw(XML_TEXT))
    return f"<{head}>{body}</{name}>"


@st.composite
def xml_payloads(draw):
    """(payload text, namespace): a <payload> element tree, in a namespace or none.

    With a namespace the root is either ``<payload xmlns="NS">`` (children inherit
    NS) or ``<p0:payload xmlns:p0="NS">`` (unprefixed children have no namespace).
    """
    ns = draw(st.one_of(st.none(), XML_NAMESPACES))
    attrs = draw(st.dictionaries(ATTR_NAMES, XML_TEXT, max_size=2))
    tag = "payload"
    if ns is None:
        head = tag
    elif draw(st.booleans()):
        head = f'payload xmlns="{ns}"'
    else:
        tag = "p0:payload"
        head = f'p0:payload xmlns:p0="{ns}"'
    head += "".join(f' {k}="{_esc_attr(v)}"' for k, v in attrs.items())
    if draw(st.booleans()):
        head += f' xml:lang="{draw(st.sampled_from(["en", "fr-CA"]))}"'
    if draw(st.booleans()):
        head += f' xmlns:p="urn:p" p:unit="{_esc_attr(draw(XML_TEXT))}"'
    body = _esc_text(draw(XML_TEXT))
    for kid in draw(st.lists(xml_elements(), max_size=3)):
        body += kid + _esc_text(draw(XML_TEXT))
    return f"<{head}>{body}</{tag}>", ns


def _optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def events(draw, payload_format=None):
    fmt = payload_format or draw(st.sampled_from(["json", "xml"]))
    common = dict(
        id=draw(NAMES), time=draw(TIMES),
        from_service=draw(_optional(NAMES)), from_instance=draw(_optional(NAMES)),
        to_service=draw(_optional(NAMES)), to_instance=draw(_optional(NAMES)),
        reply_to=draw(_optional(REPLY_CHANNELS)), re=draw(_optional(NAMES)))
    channel = draw(CHANNELS)
    if fmt == "json":
        return Event(channel, draw(JSON_VALUES), type=draw(_optional(TYPES)), **common)
    text, ns = draw(xml_payloads())
    return Event(channel, text, type=draw(st.sampled_from([None, ns])), format="xml",
                 **common)


def _canonical(doc: str) -> str:
    return ET.canonicalize(xml_data=doc, rewrite_prefixes=True)


# -- lossless conversions (properties) --------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(events("json"))
def test_json_payload_event_json_xml_json_is_lossless(ev):
    j1 = ev.to_json()
    back = from_json(from_xml(from_json(j1).to_xml()).to_json())
    assert back == ev
    assert orjson.loads(back.to_json()) == orjson.loads(j1)
    assert back.payload == ev.payload


@settings(max_examples=80, deadline=None)
@given(events("xml"))
def test_xml_payload_event_json_xml_json_is_lossless(ev):
    back = from_json(from_xml(from_json(ev.to_json()).to_xml()).to_json())
    assert back == ev
    assert back.type == ev.type
    assert _canonical(back.payload) == _canonical(ev.payload)


@settings(max_examples=80, deadline=None)
@given(events())
def test_event_xml_json_xml_is_lossless(ev):
    doc = ev.to_xml()
    first = from_xml(doc)
    assert first == ev
    doc2 = from_json(first.to_json()).to_xml()
    assert _canonical(doc2) == _canonical(doc)
    assert from_xml(doc2) == ev


# -- envelope shape ------------------------------------------------------------------------------

def test_json_encoding_has_the_documented_fields():
    ev = Event("/example.com/hb/", {"load": 0.4}, type="heartbeat", id="e1", time=12.5,
               to_service="mon", reply_to="/example.com/_inbox/me/", re="r0")
    assert orjson.loads(ev.to_json()) == {
        "id": "e1", "to": {"channel": "/example.com/hb/", "service": "mon", "instance": None},
        "from": {"service": None, "instance": None}, "type": "heartbeat", "time": 12.5,
        "reply_to": "/example.com/_inbox/me/", "re": "r0", "format": "json",
        "payload": {"load": 0.4}}


def test_xml_encoding_uses_the_event_namespace_and_type_as_payload_namespace():
    ev = Event("/example.com/hb/", {"load": 0.4}, type="heartbeat", id="e1", time=12.5,
               from_service="svc", from_instance="i1")
    root = parse_xml(ev.to_xml())
    assert root.tag == f"{{{EVENT_NS}}}event"
    assert root.find(f"{{{EVENT_NS}}}to/{{{EVENT_NS}}}channel").text == "/example.com/hb/"
    assert root.find(f"{{{EVENT_NS}}}from/{{{EVENT_NS}}}service").text == "svc"
    payload = root.find("{heartbeat}payload")
    assert payload is not None and payload.get("format") == "json"
    assert orjson.loads(payload.text) == {"load": 0.4}


def test_xml_payload_is_embedded_as_an_element():
    ev = Event("/a/", '<payload xmlns="heartbeat"><load>0.4</load></payload>', format="xml",
               id="e1", time=1.0)
    assert ev.type == "heartbeat"
    root = parse_xml(ev.to_xml())
    assert root.find("{heartbeat}payload/{heartbeat}load").text == "0.4"
    assert ev.xml_element().tag == "{heartbeat}payload"


def test_xml_payload_with_an_xml_declaration_round_trips():
    ev = Event("/a/", '<?xml version="1.0" encoding="UTF-8"?>\n<payload xmlns="t"><v>1</v>'
               '</payload>', format="xml", id="e1", time=1.0)
    assert from_xml(ev.to_xml()) == ev


def test_json_text_with_non_xml_characters_round_trips_through_xml():
    ev = Event("/a/", {"s": "\uffff\ufffe\x00\r\n"}, id="e1", time=1.0)
    assert from_xml(ev.to_xml()).payload == ev.payload


def test_events_compare_by_content():
    a = Event("/a/", [1, 2], id="e1", time=1.0)
    assert a == Event("/a/", [1, 2], id="e1", time=1.0)
    assert a != Event("/a/", [1, 3], id="e1", time=1.0)
    assert a != Event("/a/", [1, 2], id="e2", time=1.0)


def test_fresh_events_get_unique_ids_and_a_time():
    a, b = Event("/a/"), Event("/a/")
    assert a.id != b.id
    assert a.time > 0


def test_json_payload_event_has_no_xml_element():
    with pytest.raises(EventError):
        Event("/a/", {"x": 1}).xml_element()


# -- event validation ------------------------------------------------------------------------------

def test_event_to_the_root_is_refused():
    with pytest.raises(ChannelError) as info:
        Event("/", {})
    assert info.value.rule == "send-root"


@pytest.mark.parametrize("kwargs, field", [
    (dict(format="yaml"), "format"),
    (dict(id="has space"), "id"),
    (dict(id=""), "id"),
    (dict(type="a\tb"), "type"),
    (dict(to_service="x y"), "to.service"),
    (dict(from_instance="\x00"), "from.instance"),
    (dict(re=5), "re"),
    (dict(time="now"), "time"),
    (dict(time=True), "time"),
    (dict(time=float("nan")), "time"),
    (dict(time=float("inf")), "time"),
])
def test_event_field_errors_name_the_field(kwargs, field):
    with pytest.raises(EventError) as info:
        Event("/a/", {}, **kwargs)
    assert info.value.field == field


def test_type_that_cannot_be_an_xml_namespace_is_refused():
    # ElementTree writes namespaced tags as '{ns}local': a '}' in the namespace breaks it.
    with pytest.raises(EventError) as info:
        Event("/a/", {}, type="a}b")
    assert info.value.field == "type" and "'}'" in str(info.value)
    with pytest.raises(EventError):
        make_entry("/a/", {}, type="a}b")


def test_bad_reply_to_channel_is_refused():
    with pytest.raises(ChannelError):
        Event("/a/", {}, reply_to="no-slash")


def test_from_json_requires_a_channel_and_an_object():
    with pytest.raises(EventError) as info:
        from_json(b'{"payload": 1}')
    assert info.value.field == "to.channel"
    with pytest.raises(EventError):
        from_json(b"[1, 2]")
    with pytest.raises(EventError):
        from_json(b"{not json")


def test_from_json_size_bound_counts_bytes_and_is_configurable():
    ev = Event("/a/", "é" * 40, id="e1", time=1.0).to_json().decode()
    assert from_json(ev, max_bytes=400).payload == "é" * 40
    with pytest.raises(EventError) as info:
        from_json(ev, max_bytes=len(ev) + 10)      # fewer characters, more bytes
    assert "exceeds the limit" in str(info.value)


def test_from_xml_requires_the_event_root_and_fields():
    with pytest.raises(EventError) as info:
        from_xml('<event xmlns="urn:other"/>')
    assert EVENT_NS in str(info.value)
    with pytest.raises(EventError) as info:
        from_xml(f'<event xmlns="{EVENT_NS}"><payload xmlns="t"/></event>')
    assert info.value.field == "to.channel"
    with pytest.raises(EventError) as info:
        from_xml(f'<event xmlns="{EVENT_NS}"><to><channel>/a/</channel></to></event>')
    assert info.value.field == "payload"
    with pytest.raises(EventError) as info:
        from_xml(f'<event xmlns="{EVENT_NS}"><time>soon</time><to><channel>/a/</channel>'
                 f'</to><payload xmlns="t"/></event>')
    assert info.value.field == "time"


# -- attribute helper ------------------------------------------------------------------------------

def test_attribute_builds_a_psepr_attribute_payload():
    assert attribute("load_avg", 0.4, expire=60) == {"field": "load_avg", "value": 0.4,
                                                     "expire": 60}
    assert attribute("kernel", "6.1") == {"field": "kernel", "value": "6.1", "expire": None}
    assert psepr.attribute is attribute
    assert psepr.ATTRIBUTE == ATTRIBUTE == "http://psepr.org/xs/payload/attribute"


def test_attribute_event_round_trips():
    ev = Event("/a/", attribute("mem", {"free": 10}, expire=5.5), type=ATTRIBUTE, id="e",
               time=1.0)
    assert from_xml(ev.to_xml()) == ev


@pytest.mark.parametrize("field, expire, bad", [
    ("", None, "field"), (None, None, "field"), ("x", -1, "expire"), ("x", "soon", "expire"),
    ("x", True, "expire"), ("x" * 257, None, "field"), ("a\tb", None, "field"),
    # JSON has neither: NaN and infinity would go out as null, "never expires", silently.
    ("x", float("nan"), "expire"), ("x", float("inf"), "expire"),
])
def test_attribute_refuses_bad_field_or_expire(field, expire, bad):
    with pytest.raises(EventError) as info:
        attribute(field, 1, expire=expire)
    assert info.value.field == bad


# -- hardened XML ---------------------------------------------------------------------------------

DTD_DOC = '<!DOCTYPE payload [<!ELEMENT payload ANY>]><payload xmlns="t">x</payload>'
BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<payload xmlns="t">&lol9;</payload>"""
EXTERNAL_ENTITY = ('<?xml version="1.0"?><!DOCTYPE payload [<!ENTITY xxe SYSTEM '
                   '"file:///etc/passwd">]><payload xmlns="t">&xxe;</payload>')
EXTERNAL_DTD = ('<!DOCTYPE payload SYSTEM "file:///etc/passwd">'
                '<payload xmlns="t">x</payload>')


def _event_doc(payload: str) -> str:
    return (f'<event xmlns="{EVENT_NS}"><id>e1</id><time>1.0</time><to><channel>/a/</channel>'
            f'</to>{payload}</event>')


@pytest.mark.parametrize("doc", [DTD_DOC, BILLION_LAUGHS, EXTERNAL_ENTITY, EXTERNAL_DTD],
                         ids=["dtd", "billion-laughs", "external-entity", "external-dtd"])
def test_hostile_xml_payload_is_refused_saying_why(doc):
    with pytest.raises(XMLRefused) as info:
        Event("/a/", doc, format="xml")
    message = str(info.value)
    assert "DTD" in message and "not accepted" in message
    assert "root:" not in message


@pytest.mark.parametrize("doc", [BILLION_LAUGHS, EXTERNAL_ENTITY])
def test_hostile_xml_event_document_is_refused(doc):
    # The same hostile prologue in front of a whole event document.
    prologue, _, _ = doc.rpartition("<payload")
    with pytest.raises(XMLRefused) as info:
        from_xml(prologue + _event_doc('<payload xmlns="t">x</payload>'))
    assert "DTD" in str(info.value)


def test_undeclared_entity_reference_is_refused_as_malformed():
    with pytest.raises(XMLRefused) as info:
        parse_xml('<payload xmlns="t">&xxe;</payload>')
    assert "not well-formed" in str(info.value)


def test_xml_text_that_cannot_be_utf8_is_refused_not_raised_as_unicode_error():
    # Bytes that were not UTF-8, read with surrogateescape (stdin, argv): a lone surrogate.
    for call in (lambda d: parse_xml(d), lambda d: Event("/a/", d, format="xml"),
                 lambda d: make_entry("/a/", d, format="xml")):
        with pytest.raises(XMLRefused) as info:
            call('<payload xmlns="t">\udcff</payload>')
        assert str(info.value) == ("XML refused: character 19 ('\\udcff') is not text: was the "
                                   "input UTF-8?")


def test_hostile_xml_is_refused_by_make_entry_too():
    with pytest.raises(XMLRefused):
        make_entry("/a/", EXTERNAL_ENTITY, format="xml")


def test_document_above_the_default_limit_is_refused():
    filler = "x" * (MAX_EVENT_BYTES + 1)
    with pytest.raises(XMLRefused) as info:
        parse_xml(f'<payload xmlns="t">{filler}</payload>')
    assert f"limit of {MAX_EVENT_BYTES} bytes" in str(info.value)
    with pytest.raises(XMLRefused):
        Event("/a/", f'<payload xmlns="t">{filler}</payload>', format="xml")
    with pytest.raises(XMLRefused):
        from_xml(_event_doc(f'<payload xmlns="t">{filler}</payload>'))


def test_document_at_the_default_limit_is_accepted():
    head, tail = '<payload xmlns="t">', "</payload>"
    doc = head + "x" * (MAX_EVENT_BYTES - len(head) - len(tail)) + tail
    assert len(doc.encode()) == MAX_EVENT_BYTES
    assert parse_xml(doc).tag == "{t}payload"


def test_size_limit_is_configurable_and_counts_bytes():
    doc = '<payload xmlns="t">' + "é" * 30 + "</payload>"
    size = len(doc.encode())
    assert parse_xml(doc, max_bytes=size).tag == "{t}payload"
    with pytest.raises(XMLRefused) as info:
        parse_xml(doc, max_bytes=size - 1)
    assert f"{size} bytes" in str(info.value)
    with pytest.raises(XMLRefused):
        check_xml_payload(doc, max_bytes=size - 1)
    ev_doc = Event("/a/", doc, format="xml", id="e", time=1.0).to_xml()
    with pytest.raises(XMLRefused):
        from_xml(ev_doc, max_bytes=100)


@pytest.mark.parametrize("doc", ["", "not xml", "<payload xmlns='t'>", "<payload></oops>",
                                 "<payload/><payload/>", "<a:payload/>"])
def test_malformed_xml_is_refused(doc):
    with pytest.raises(XMLRefused) as info:
        Event("/a/", doc, format="xml")
    assert "not well-formed" in str(info.value)


def test_non_utf8_payload_bytes_are_refused():
    with pytest.raises(XMLRefused) as info:
        check_xml_payload(b'\xff<payload xmlns="t"/>')
    assert "UTF-8" in str(info.value)


def test_non_payload_root_is_refused():
    with pytest.raises(EventError) as info:
        Event("/a/", '<load xmlns="t">1</load>', format="xml")
    assert "<payload>" in str(info.value) and "<load>" in str(info.value)


def test_xml_payload_must_be_text():
    with pytest.raises(EventError) as info:
        Event("/a/", {"not": "xml"}, format="xml")
    assert info.value.field == "payload"


def test_type_and_payload_namespace_must_agree():
    with pytest.raises(EventError) as info:
        Event("/a/", '<payload xmlns="urn:x"/>', format="xml", type="urn:y")
    assert info.value.field == "type"
    assert "urn:x" in str(info.value) and "urn:y" in str(info.value)


def test_payload_without_namespace_has_no_type_and_round_trips():
    ev = Event("/a/", "<payload><v>1</v></payload>", format="xml", id="e", time=1.0)
    assert ev.type is None
    back = from_xml(ev.to_xml())
    assert back == ev and back.type is None
    assert ET.fromstring(back.payload).find("v") is not None


def test_unprefixed_children_of_a_prefixed_payload_keep_no_namespace():
    ev = Event("/a/", '<p:payload xmlns:p="t"><v>1</v></p:payload>', format="xml", id="e",
               time=1.0)
    back = from_xml(ev.to_xml())
    assert back == ev
    assert ET.fromstring(back.payload).find("v") is not None


# -- session.make_entry ------------------------------------------------------------------------------

def test_make_entry_encodes_a_plain_json_event():
    eid, channel, typ, t, fmt, opts, raw = make_entry("/a/b/", {"load": 0.4}, type="hb", id="e1")
    assert (eid, channel, typ, fmt, opts) == ("e1", "/a/b/", "hb", wire.FMT_JSON, None)
    assert isinstance(t, float)
    assert orjson.loads(raw) == {"load": 0.4}


def test_make_entry_fresh_ids_are_unique():
    assert make_entry("/a/", 1)[0] != make_entry("/a/", 1)[0]


def test_make_entry_adds_options_only_when_needed():
    item = make_entry("/a/", 1, to_service="s", to_instance="i", reply_to="/a/_inbox/x/",
                      re="r1")
    assert item[5] == {"ts": "s", "ti": "i", "rt": "/a/_inbox/x/", "re": "r1"}
    assert make_entry("/a/", 1)[5] is None


def test_make_entry_takes_the_type_of_an_xml_payload_from_its_namespace():
    _, _, typ, _, fmt, _, raw = make_entry("/a/", '<payload xmlns="hb"><v>1</v></payload>',
                                           format="xml")
    assert typ == "hb" and fmt == wire.FMT_XML
    assert raw == b'<payload xmlns="hb"><v>1</v></payload>'


def test_make_entry_accepts_a_whole_event():
    ev = Event("/a/", [1], type="t", id="e9", to_service="s", from_service="forged")
    eid, channel, typ, _, _, opts, raw = make_entry(ev)
    assert (eid, channel, typ, opts) == ("e9", "/a/", "t", {"ts": "s"})
    assert orjson.loads(raw) == [1]


def test_make_entry_items_pack_into_a_send_message():
    items = [make_entry("/a/", i, id=f"e{i}") for i in range(3)] + [make_entry("/b/", "x")]
    kind, header, [body] = wire.decode(wire.encode_send(items))
    assert kind == wire.Kind.SEND
    assert header["g"] == [["/a/", None, None, 3], ["/b/", None, None, 1]]
    assert header["i"][:3] == ["e0", "e1", "e2"]
    assert header["l"] == [1, 1, 1, 3]
    assert body == b'012"x"'
    back = wire.unpack_events(header, body)
    assert [(i[0], i[1], bytes(i[6])) for i in back] == [
        (it[0], it[1], it[6]) for it in items]


@pytest.mark.parametrize("args, kwargs, exc, field", [
    (("/", 1), {}, ChannelError, None),
    (("a/", 1), {}, ChannelError, None),
    (("/a/", {1, 2}), {}, EventError, "payload"),
    (("/a/", 1), dict(format="yaml"), EventError, "format"),
    (("/a/", '<payload xmlns="x"/>'), dict(format="xml", type="y"), EventError, "type"),
    (("/a/", "x" * 100), dict(max_bytes=50), EventError, "payload"),
    (("/a/", 1), dict(type="a b"), EventError, "type"),
    (("/a/", 1), dict(to_service="a b"), EventError, "to_service"),
    (("/a/", 1), dict(to_instance=""), EventError, "to_instance"),
    (("/a/", 1), dict(re="\n"), EventError, "re"),
    (("/a/", 1), dict(reply_to="nope"), ChannelError, None),
    (("/a/", 1), dict(id="a b"), EventError, "id"),
    (("/a/", 1), dict(id="a b", to_service="s"), EventError, "id"),
])
def test_make_entry_refuses_bad_input_precisely(args, kwargs, exc, field):
    with pytest.raises(exc) as info:
        make_entry(*args, **kwargs)
    if field is not None:
        assert info.value.field == field


def test_make_entry_size_bound_counts_encoded_bytes():
    raw = make_entry("/a/", "x" * 10, max_bytes=12)[6]   # '"xxxxxxxxxx"' is 12 bytes
    assert len(raw) == 12
    with pytest.raises(EventError):
        make_entry("/a/", "x" * 11, max_bytes=12)



def _nested(levels: int) -> str:
    """A payload element with ``levels`` levels of elements, itself included."""
    return '<payload xmlns="t">' + "<a>" * (levels - 1) + "</a>" * (levels - 1) + "</payload>"


def test_xml_nested_up_to_the_bound_is_accepted_and_prints():
    ev = psepr.Event("/example.com/x/", _nested(MAX_XML_DEPTH - 1), format="xml")
    # The envelope adds one level: the whole document sits exactly at the bound.
    assert psepr.from_xml(ev.to_xml()).payload == ev.payload


@pytest.mark.parametrize("levels", [MAX_XML_DEPTH + 1, 5000])
def test_xml_nested_beyond_the_bound_is_refused_by_name(levels):
    # 5,000 levels (40 KB) made every reader that printed the event as XML die of
    # RecursionError, `psepr lease --output xml` included.
    with pytest.raises(XMLRefused, match=f"nested more than {MAX_XML_DEPTH} levels"):
        psepr.Event("/example.com/x/", _nested(levels), format="xml")
    with pytest.raises(XMLRefused, match="nested more than"):
        parse_xml(_nested(levels))
