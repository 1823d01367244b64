"""The PsEPR channel grammar and element-wise covering (issue 2, acceptance 1).

Proves that:

* valid channels parse to their elements, and the root ``/`` is a valid lease
  target that :func:`parse_destination` refuses;
* every invalid name raises :class:`ChannelError` whose message quotes the input
  and whose ``rule`` names the broken rule (one test per rule);
* length and depth bounds are exact (the limit is accepted, one more is not);
* covering is element-wise (``/a/b/`` covers ``/a/b/c/``, not ``/a/bc/``);
* properties (hypothesis): generated element lists round-trip through
  ``parse(text).parts``; covering equals the parts-prefix relation;
  ``prefixes()`` is root-first and each prefix covers the channel; arbitrary
  text either parses or raises ChannelError, never another exception.
"""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psepr.channel import MAX_DEPTH, MAX_LENGTH, Channel, covers, parse, parse_destination
from psepr.errors import ChannelError, PseprError, UsageError

# Characters an element may hold: printable, no whitespace, no '/', no '*'.
# Python's str.isprintable() is False exactly for the categories excluded here.
ELEMENT_CHARS = st.characters(
    exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"),
    exclude_characters="/*")
ELEMENTS = st.text(ELEMENT_CHARS, min_size=1, max_size=8)


def text_of(parts) -> str:
    return "/" + "".join(p + "/" for p in parts)


# -- valid names ------------------------------------------------------------------

@pytest.mark.parametrize("text, parts", [
    ("/", ()),
    ("/example.com/", ("example.com",)),
    ("/example.com/heartbeat/x.example.com/", ("example.com", "heartbeat", "x.example.com")),
    ("/a/b-c_d/e.f:g@h/", ("a", "b-c_d", "e.f:g@h")),
    ("/exämple.org/数据/🙂/", ("exämple.org", "数据", "🙂")),
    ("/a/<&>\"'/", ("a", "<&>\"'")),
])
def test_valid_names_parse_to_their_elements(text, parts):
    ch = parse(text)
    assert ch.text == text
    assert ch.parts == parts
    assert ch.depth == len(parts)
    assert str(ch) == text


def test_root_is_a_valid_lease_target():
    root = parse("/")
    assert root.is_root
    assert root.authority is None
    assert root.parent is None
    assert root.prefixes() == ("/",)


def test_parse_destination_refuses_the_root():
    with pytest.raises(ChannelError) as info:
        parse_destination("/")
    assert info.value.rule == "send-root"
    assert "'/'" in str(info.value)


def test_parse_destination_accepts_an_authority_channel():
    assert parse_destination("/example.com/").authority == "example.com"


def test_parse_returns_an_existing_channel_unchanged():
    ch = parse("/a/b/")
    assert parse(ch) is ch
    assert parse_destination(ch) is ch


def test_channel_value_semantics():
    a, b = parse("/a/b/"), parse("/a/" + "b/")
    assert a == b and hash(a) == hash(b)
    assert a != parse("/a/c/")
    assert a < parse("/a/c/")
    assert pickle.loads(pickle.dumps(a)) == a
    assert repr(a) == "Channel('/a/b/')"
    assert a != "/a/b/"          # a Channel never equals a raw string


def test_child_and_parent_are_inverse():
    ch = parse("/example.com/")
    kid = ch.child("x", "y")
    assert kid.text == "/example.com/x/y/"
    assert kid.parent == parse("/example.com/x/")
    assert kid.parent.parent == ch
    assert ch.parent == parse("/")


def test_child_validates_its_elements():
    with pytest.raises(ChannelError) as info:
        parse("/a/").child("b c")
    assert info.value.rule == "whitespace"


def test_errors_belong_to_the_usage_branch_of_the_error_tree():
    with pytest.raises(ChannelError) as info:
        parse("nope")
    assert isinstance(info.value, UsageError)
    assert isinstance(info.value, PseprError)
    assert isinstance(info.value, ValueError)


# -- invalid names: each rule, quoted input ------------------------------------------

@pytest.mark.parametrize("text, rule", [
    ("", "rooted"),
    ("a/b/", "rooted"),
    ("example.com/", "rooted"),
    ("/a/b", "trailing-slash"),
    ("/a", "trailing-slash"),
    ("//", "empty-element"),
    ("/a//b/", "empty-element"),
    ("/a/b//", "empty-element"),
    ("/*/", "reserved-char"),
    ("/a/b*/", "reserved-char"),
    ("/a/b c/", "whitespace"),
    ("/a/\tb/", "whitespace"),
    ("/a/b\u00a0c/", "whitespace"),
    ("/a/b\u3000/", "whitespace"),
    ("/a/\x00/", "control-char"),
    ("/a/\x7f/", "control-char"),
    ("/a/b\u200bc/", "control-char"),
    ("/a/\ud800/", "utf-8"),
])
def test_invalid_name_names_the_rule_and_quotes_the_input(text, rule):
    with pytest.raises(ChannelError) as info:
        parse(text)
    err = info.value
    assert err.rule == rule
    assert err.text == text
    assert repr(text) in str(err)
    assert f"[{rule}]" in str(err)


@pytest.mark.parametrize("value", [None, 42, b"/a/", ["/a/"]])
def test_non_string_input_is_refused_with_the_type_rule(value):
    with pytest.raises(ChannelError) as info:
        parse(value)
    assert info.value.rule == "type"
    assert repr(value) in str(info.value)


# -- bounds -------------------------------------------------------------------------------

def test_longest_channel_is_accepted_and_one_byte_more_is_not():
    # "/" + element + "/" == MAX_LENGTH bytes
    longest = "/" + "a" * (MAX_LENGTH - 2) + "/"
    assert len(longest.encode()) == MAX_LENGTH
    assert parse(longest).depth == 1
    too_long = "/" + "a" * (MAX_LENGTH - 1) + "/"
    with pytest.raises(ChannelError) as info:
        parse(too_long)
    assert info.value.rule == "too-long"


def test_a_runaway_channel_is_named_briefly_in_its_error():
    # A client or a CLI user who pasted a whole file gets one short line, not 5,000
    # characters; the whole input stays on the exception.
    text = "/x.org/" + "y" * 5000 + "/"
    with pytest.raises(ChannelError) as info:
        parse(text)
    message = str(info.value)
    assert len(message) < 200 and "(5008 characters)" in message, message
    assert info.value.text == text and info.value.rule == "too-long"
    assert str(ChannelError("/a b/", "whitespace", "d")) == "invalid channel '/a b/': d [whitespace]"


def test_length_is_counted_in_utf8_bytes():
    # 'é' is 2 bytes: this text has fewer than MAX_LENGTH characters but more bytes.
    text = "/" + "é" * ((MAX_LENGTH // 2)) + "/"
    assert len(text) < MAX_LENGTH < len(text.encode())
    with pytest.raises(ChannelError) as info:
        parse(text)
    assert info.value.rule == "too-long"


def test_deepest_channel_is_accepted_and_one_more_element_is_not():
    assert parse(text_of(["e"] * MAX_DEPTH)).depth == MAX_DEPTH
    with pytest.raises(ChannelError) as info:
        parse(text_of(["e"] * (MAX_DEPTH + 1)))
    assert info.value.rule == "too-deep"


# -- covering ----------------------------------------------------------------------------------

@pytest.mark.parametrize("lease, target, expected", [
    ("/a/b/", "/a/b/", True),
    ("/a/b/", "/a/b/c/", True),
    ("/a/b/", "/a/b/c/d/", True),
    ("/a/b/", "/a/bc/", False),
    ("/a/b/", "/a/", False),
    ("/a/b/", "/x/a/b/", False),
    ("/", "/anything/at/all/", True),
    ("/a/", "/ab/", False),
])
def test_covering_is_element_wise(lease, target, expected):
    assert parse(lease).covers(parse(target)) is expected
    assert covers(lease, target) is expected


def test_covers_function_validates_both_names():
    with pytest.raises(ChannelError):
        covers("/a/", "/a b/")
    with pytest.raises(ChannelError):
        covers("a", "/a/")


def test_prefixes_of_a_channel():
    assert parse("/a/b/c/").prefixes() == ("/", "/a/", "/a/b/", "/a/b/c/")


# -- properties ----------------------------------------------------------------------------------

@given(st.lists(ELEMENTS, max_size=8))
def test_generated_valid_channels_round_trip(parts):
    ch = parse(text_of(parts))
    assert ch.parts == tuple(parts)
    assert ch.text == text_of(parts)
    assert parse(ch.text) == ch


SMALL_ELEMENTS = st.sampled_from(["a", "b", "ab", "ba", "a.b"])


@given(st.lists(SMALL_ELEMENTS, max_size=4), st.lists(SMALL_ELEMENTS, max_size=5))
def test_covering_equals_parts_prefix_relation(lease_parts, target_parts):
    lease, target = parse(text_of(lease_parts)), parse(text_of(target_parts))
    expected = tuple(target_parts[:len(lease_parts)]) == tuple(lease_parts)
    assert lease.covers(target) is expected


@given(st.lists(ELEMENTS, max_size=8))
def test_prefixes_are_root_first_and_each_covers_the_channel(parts):
    ch = parse(text_of(parts))
    prefixes = ch.prefixes()
    assert len(prefixes) == ch.depth + 1
    assert prefixes[0] == "/"
    assert prefixes[-1] == ch.text
    for i, p in enumerate(prefixes):
        pc = parse(p)
        assert pc.parts == ch.parts[:i]
        assert pc.covers(ch)


@given(st.lists(ELEMENTS, min_size=1, max_size=8), st.data())
def test_any_prefix_of_parts_covers_and_no_extension_is_covered_back(parts, data):
    ch = parse(text_of(parts))
    extra = data.draw(ELEMENTS)
    kid = ch.child(extra)
    assert ch.covers(kid)
    assert not kid.covers(ch)
    # Appending characters to the last element never yields a covered channel.
    sibling = parse(text_of(parts[:-1] + [parts[-1] + extra]))
    assert not ch.covers(sibling)


CHANNELISH = st.text(st.sampled_from(list("/ab*. \t\x00é\u200b\u00a0")), max_size=20)


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=40), CHANNELISH))
def test_arbitrary_text_parses_or_raises_channel_error(text):
    try:
        ch = parse(text)
    except ChannelError as exc:
        assert exc.text == text
        assert repr(text) in str(exc)
        return
    assert isinstance(ch, Channel)
    assert ch.text == text
    assert text_of(ch.parts) == text


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=60)
       .map(lambda t: "/" + t + "/"))
def test_ascii_fast_path_agrees_with_the_rule_by_rule_check(text):
    """The regex fast path accepts exactly what the full, rule-naming check accepts."""
    from psepr.channel import _parse_slow, _parse_text
    try:
        slow = _parse_slow(text)
    except ChannelError:
        slow = None
    try:
        fast = _parse_text.__wrapped__(text)
    except ChannelError:
        fast = None
    assert (slow is None) == (fast is None)
    if slow is not None:
        assert slow.parts == fast.parts and slow.text == fast.text
