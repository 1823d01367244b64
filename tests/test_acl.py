"""Access control lists (registry/acl.py) loaded from TOML files.

Proves that ``load_acl`` binds keys (inline or from a CURVE certificate made by
``zmq.auth.create_certificates``) to principals; that send and lease grants
apply to channel prefixes element-wise; that the implicit inbox grants let
every principal lease its own inbox (only its own) and reply into any inbox;
and that bad files fail with a ConfigError naming the file and the entry: bad
TOML, a bad channel, a duplicate key, a key of the wrong length, a missing key
file, grants that are not lists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq.auth

from psepr.channel import parse
from psepr.errors import ConfigError, UsageError
from registry.acl import ACL, Principal, load_acl

KEY_A = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"    # 40 Z85 characters
KEY_B = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"


def write(tmp_path: Path, text: str, name: str = "acl.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def toml_str(s: str) -> str:
    """A TOML literal string (Z85 keys may contain '\"' but never a quote of this kind)."""
    assert "'" not in s
    return f"'{s}'"


@pytest.fixture
def acl(tmp_path) -> ACL:
    return load_acl(write(tmp_path, f"""
[principals.sensor]
key = {toml_str(KEY_A)}
send = ["/example.com/node/"]
lease = ["/example.com/"]

[principals.ops]
key = {toml_str(KEY_B)}
send = ["/"]
"""))


# -- loading and grants ---------------------------------------------------------------

def test_principals_and_keys_are_loaded(acl):
    assert set(acl.principals) == {"sensor", "ops"}
    assert acl.by_key == {KEY_A: "sensor", KEY_B: "ops"}
    sensor = acl.principals["sensor"]
    assert sensor == Principal("sensor", KEY_A, (parse("/example.com/node/"),),
                               (parse("/example.com/"),))


@pytest.mark.parametrize("channel, allowed", [
    ("/example.com/node/", True),
    ("/example.com/node/x.example.com/load/", True),
    ("/example.com/nodes/", False),
    ("/example.com/", False),
    ("/other.org/node/", False),
])
def test_send_grants_cover_by_prefix_element_wise(acl, channel, allowed):
    assert acl.may_send("sensor", parse(channel)) is allowed


@pytest.mark.parametrize("channel, allowed", [
    ("/example.com/", True),
    ("/example.com/anything/below/", True),
    ("/example.co/", False),
    ("/", False),
])
def test_lease_grants_cover_by_prefix_element_wise(acl, channel, allowed):
    assert acl.may_lease("sensor", parse(channel)) is allowed


def test_root_grant_covers_everything(acl):
    assert acl.may_send("ops", parse("/any.org/thing/"))
    assert not acl.may_lease("ops", parse("/any.org/thing/"))


def test_unknown_principal_has_no_explicit_grants(acl):
    assert not acl.may_send("stranger", parse("/example.com/node/"))
    assert not acl.may_lease("stranger", parse("/example.com/"))


def test_every_principal_may_lease_its_own_inbox_only(acl):
    assert acl.may_lease("ops", parse("/example.com/_inbox/ops/"))
    assert acl.may_lease("ops", parse("/x.org/_inbox/ops/req-1/"))
    assert acl.may_lease("stranger", parse("/x.org/_inbox/stranger/"))
    assert not acl.may_lease("ops", parse("/example.com/_inbox/sensor/"))
    assert not acl.may_lease("ops", parse("/example.com/_inbox/"))
    assert not acl.may_lease("ops", parse("/example.com/_inbox/opsx/"))


def test_every_principal_may_reply_into_any_inbox(acl):
    assert acl.may_send("sensor", parse("/example.com/_inbox/ops/"))
    assert acl.may_send("stranger", parse("/x.org/_inbox/someone/r1/"))
    assert not acl.may_send("stranger", parse("/x.org/inbox/someone/"))


def test_missing_grants_default_to_none(tmp_path):
    acl = load_acl(write(tmp_path, "[principals.quiet]\n"))
    assert acl.principals["quiet"] == Principal("quiet")
    assert not acl.may_send("quiet", parse("/a/"))


def test_empty_file_is_an_empty_acl(tmp_path):
    acl = load_acl(write(tmp_path, ""))
    assert acl.principals == {} and acl.by_key == {}


# -- key files ------------------------------------------------------------------------------

def test_key_file_is_read_relative_to_the_acl_file(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    public_file, _ = zmq.auth.create_certificates(keys, "sensor")
    public, _ = zmq.auth.load_certificate(public_file)
    acl = load_acl(write(tmp_path, """
[principals.sensor]
key_file = "keys/sensor.key"
send = ["/a/"]
"""))
    assert acl.principals["sensor"].key == public.decode()
    assert acl.by_key == {public.decode(): "sensor"}


def test_key_file_may_be_the_secret_certificate(tmp_path):
    public_file, secret_file = zmq.auth.create_certificates(tmp_path, "svc")
    public, _ = zmq.auth.load_certificate(public_file)
    acl = load_acl(write(tmp_path, f'[principals.svc]\nkey_file = "{Path(secret_file).name}"\n'))
    assert acl.principals["svc"].key == public.decode()


def test_two_principals_with_the_same_key_file_are_refused(tmp_path):
    zmq.auth.create_certificates(tmp_path, "shared")
    path = write(tmp_path, """
[principals.one]
key_file = "shared.key"
[principals.two]
key_file = "shared.key"
""")
    with pytest.raises(ConfigError) as info:
        load_acl(path)
    assert "share one key" in str(info.value)


def test_missing_key_file_is_a_config_error(tmp_path):
    path = write(tmp_path, '[principals.svc]\nkey_file = "nope.key"\n')
    with pytest.raises(ConfigError) as info:
        load_acl(path)
    assert "principals.svc.key_file" in str(info.value)
    assert "nope.key" in str(info.value)


def test_key_file_must_be_a_file_name(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_acl(write(tmp_path, "[principals.svc]\nkey_file = 5\n"))
    assert "principals.svc.key_file must be a file name" in str(info.value)


def test_key_file_without_a_public_key_is_a_config_error(tmp_path):
    (tmp_path / "junk.key").write_text("# not a certificate\n")
    with pytest.raises(ConfigError) as info:
        load_acl(write(tmp_path, '[principals.svc]\nkey_file = "junk.key"\n'))
    assert "principals.svc.key_file" in str(info.value)


# -- errors ---------------------------------------------------------------------------------

def test_bad_toml_is_a_config_error_naming_the_file(tmp_path):
    path = write(tmp_path, "[principals.sensor\nsend = [")
    with pytest.raises(ConfigError) as info:
        load_acl(path)
    assert str(path) in str(info.value)
    assert "not valid TOML" in str(info.value)
    assert isinstance(info.value, UsageError)


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_acl(tmp_path / "missing.toml")
    assert "cannot read ACL file" in str(info.value)


@pytest.mark.parametrize("kind", ["send", "lease"])
def test_bad_channel_is_a_config_error_naming_the_entry(tmp_path, kind):
    path = write(tmp_path, f'[principals.sensor]\n{kind} = ["/ok/", "/bad channel/"]\n')
    with pytest.raises(ConfigError) as info:
        load_acl(path)
    message = str(info.value)
    assert f"principals.sensor.{kind}" in message
    assert "'/bad channel/'" in message and "[whitespace]" in message
    assert str(path) in message


def test_grants_must_be_a_list(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_acl(write(tmp_path, '[principals.sensor]\nsend = "/a/"\n'))
    assert "principals.sensor.send must be a list" in str(info.value)


def test_duplicate_key_is_a_config_error_naming_both(tmp_path):
    path = write(tmp_path, f"""
[principals.one]
key = {toml_str(KEY_A)}
[principals.two]
key = {toml_str(KEY_A)}
""")
    with pytest.raises(ConfigError) as info:
        load_acl(path)
    assert "principals.two" in str(info.value) and "principals.one" in str(info.value)


@pytest.mark.parametrize("key", ["'short'", repr(KEY_A + "x"), "42"])
def test_wrong_key_length_or_type_is_a_config_error(tmp_path, key):
    with pytest.raises(ConfigError) as info:
        load_acl(write(tmp_path, f"[principals.svc]\nkey = {key}\n"))
    assert "principals.svc.key must be a 40-character Z85 CURVE public key" in str(info.value)


def test_principals_must_be_tables(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_acl(write(tmp_path, 'principals = "everyone"\n'))
    assert "[principals] must be a table" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_acl(write(tmp_path, '[principals]\nsensor = 1\n'))
    assert "principals.sensor must be a table" in str(info.value)


def test_a_principal_may_not_be_named_as_the_routers_service(tmp_path):
    path = write(tmp_path, f'[principals.psepr-router]\nkey = "{KEY_A}"\nsend = ["/"]\n')
    with pytest.raises(ConfigError, match="principal name 'psepr-router' is reserved"):
        load_acl(path)
