"""Join tokens: the text form, issue, the join check in its order, the record's state changes, name validation."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.tokens import (
    DEFAULT_TTL,
    MAX_TTL,
    PREFIX,
    BoundToAnotherCertificate,
    CertificateNameMismatch,
    Consumed,
    Expired,
    IllegalTokenTransition,
    InvalidTokenRequest,
    JoinToken,
    MalformedToken,
    NameMismatch,
    Revoked,
    TokenInfo,
    TokenInUse,
    TokenRecord,
    TokenRefused,
    TokenState,
    UnknownToken,
    WrongCluster,
    bind,
    check_join,
    consume,
    decode_token,
    dns_name_problem,
    encode_token,
    info,
    issue,
    release,
    revoke,
    verify_coordinator,
)

NOW = 1_700_000_000.0
SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
COORDINATOR = "c" * 64
JOINER = "a" * 64
THIEF = "b" * 64
CLUSTER = "0f8e4a52-9d1b-4c7e-a3f0-6b2d5c8e9a10"
ADDRESSES = ("10.0.0.1:7443", "[fd00::1]:7443", "coordinator.example:7443")


def issued(name: str = "n4", secret: bytes = SECRET, ttl: float | None = 3600.0) -> tuple[str, TokenRecord]:
    return issue(
        name,
        secret,
        now=NOW,
        ttl=ttl,
        issued_by="operator",
        coordinator_fingerprint=COORDINATOR,
        cluster_id=CLUSTER,
        join_addresses=ADDRESSES,
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def secret_forms(secret: bytes) -> list[str]:
    return [b64(secret), base64.b64encode(secret).decode(), secret.hex(), hashlib.sha256(secret).hexdigest()]


def assert_discreet(error: BaseException, text: str, secret: bytes = SECRET) -> None:
    """Neither the message nor the metadata nor the repr names the token text, the secret or its digest."""
    said = [str(error), repr(error)]
    if isinstance(error, TokenRefused):
        said += [*error.metadata.keys(), *error.metadata.values()]
    for part in said:
        assert text not in part
        for form in secret_forms(secret):
            assert form not in part


def payload_of(text: str) -> dict[str, object]:
    body = text[len(PREFIX) :]
    loaded: dict[str, object] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return loaded


def text_of(payload: object, *, sort_keys: bool = True) -> str:
    body = json.dumps(payload, sort_keys=sort_keys, separators=(",", ":")).encode()
    return PREFIX + b64(body)


# --- the text form --------------------------------------------------------------------------------------------------


def test_round_trip() -> None:
    token = JoinToken("n4.example", SECRET, COORDINATOR, ADDRESSES, CLUSTER, NOW + 60.5)
    text = encode_token(token)
    assert text.startswith("mgt1.")
    assert all(c.isalnum() or c in "-_." for c in text)  # URL-safe, no padding
    assert decode_token(text) == token
    assert decode_token(text).secret == SECRET
    assert decode_token(text).secret_digest == hashlib.sha256(SECRET).hexdigest()


def test_payload_fields() -> None:
    text, _ = issued()
    assert payload_of(text) == {
        "cluster_id": CLUSTER,
        "expires_at": NOW + 3600.0,
        "fingerprint": COORDINATOR,
        "join_addresses": list(ADDRESSES),
        "name": "n4",
        "secret": b64(SECRET),
    }


def test_repr_hides_the_secret_and_the_digest() -> None:
    text, record = issued()
    token = decode_token(text)
    for shown in (repr(token), str(token), repr(record), repr(info(record))):
        for form in secret_forms(SECRET):
            assert form not in shown


def test_integer_expiry_is_stored_as_float() -> None:
    token = JoinToken("n4", SECRET, COORDINATOR, ADDRESSES, CLUSTER, 1_700_000_000)
    assert isinstance(token.expires_at, float)
    assert decode_token(encode_token(token)) == token


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "does not start"),
        ("mgt1", "does not start"),
        ("MGT1." + "e" * 40, "does not start"),
        ("mgt2.eyJ9", "version is not supported"),
        ("mgt1.", "not JSON"),
        ("mgt1.!!!!", "not base64url"),
        ("mgt1.eyJ9=", "not base64url"),  # padding
        ("mgt1.eyJ9\n", "not base64url"),
        ("mgt1.eyK", "not base64url"),  # non-zero trailing bits: not canonical
        ("mgt1." + b64(b"\xff\xfe{}"), "not JSON"),
        ("mgt1." + b64(b"[]"), "not a JSON object"),
        ("mgt1." + b64(b"{}"), "lacks cluster_id, expires_at"),
        ("x" * 20000, "longer than"),
    ],
)
def test_malformed_texts(text: str, says: str) -> None:
    with pytest.raises(MalformedToken, match=says):
        decode_token(text)


def test_not_text() -> None:
    with pytest.raises(MalformedToken, match="not text"):
        decode_token(b"mgt1.")


def _valid_payload() -> dict[str, object]:
    return payload_of(issued()[0])


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"extra": 1}, "1 unknown field"),
        ({"name": 4}, "name is not a string"),
        ({"secret": None}, "secret is not a string"),
        ({"fingerprint": ["x"]}, "fingerprint is not a string"),
        ({"cluster_id": 1.0}, "cluster_id is not a string"),
        ({"join_addresses": "10.0.0.1:7443"}, "join_addresses is not a list"),
        ({"join_addresses": [1]}, "join_addresses is not a list"),
        ({"expires_at": 1_700_000_000}, "expires_at is not a number with a fraction"),
        ({"expires_at": True}, "expires_at is not a number"),
        ({"expires_at": "1700000000.0"}, "expires_at is not a number"),
        ({"expires_at": -1.0}, "expires_at must be a positive"),
        ({"secret": b64(bytes(31))}, "secret must be 32 to 64 bytes"),
        ({"secret": "short"}, "secret is not base64url"),
        ({"secret": b64(SECRET) + "="}, "secret is not base64url"),
        ({"secret": b64(bytes(65))}, "secret must be 32 to 64 bytes"),
        ({"name": "N4"}, "name must be lowercase"),
        ({"name": ""}, "name must not be empty"),
        ({"fingerprint": COORDINATOR.upper()}, "fingerprint must be 64 lowercase hex"),
        ({"fingerprint": "c" * 63}, "fingerprint must be 64 lowercase hex"),
        ({"join_addresses": []}, "join_addresses must hold 1 to 32"),
        ({"join_addresses": ["10.0.0.1:7443"] * 2}, "duplicate"),
        ({"join_addresses": ["10.0.0.1"]}, "join address 1 is not"),
        ({"join_addresses": ["10.0.0.1:0"]}, "join address 1 is not"),
        ({"join_addresses": ["10.0.0.1:65536"]}, "join address 1 is not"),
        ({"join_addresses": ["10.0.0.1:7443", "fd00::1:7443"]}, "join address 2 is not"),
        ({"join_addresses": ["[fd00:::1]:7443"]}, "malformed IPv6"),
        ({"cluster_id": ""}, "cluster_id must be 1 to 64"),
        ({"cluster_id": "a b"}, "cluster_id must be 1 to 64"),
    ],
)
def test_malformed_fields(change: dict[str, object], says: str) -> None:
    payload = _valid_payload() | change
    text = text_of(payload)
    with pytest.raises(MalformedToken, match=says) as raised:
        decode_token(text)
    assert_discreet(raised.value, text)


@pytest.mark.parametrize("field", ["cluster_id", "expires_at", "fingerprint", "join_addresses", "name", "secret"])
def test_missing_field(field: str) -> None:
    payload = _valid_payload()
    del payload[field]
    with pytest.raises(MalformedToken, match=f"lacks {field}"):
        decode_token(text_of(payload))


@pytest.mark.parametrize(
    "spelling",
    [
        lambda p: json.dumps(p, sort_keys=False),  # key order, spaces
        lambda p: json.dumps(p, sort_keys=True),  # spaces
        lambda p: json.dumps(p, sort_keys=True, separators=(",", ":")) + " ",
        lambda p: json.dumps(p, sort_keys=True, separators=(",", ":")).replace('"n4"', '"\\u006e4"'),
        lambda p: '{"name":"x",' + json.dumps(p, sort_keys=True, separators=(",", ":"))[1:],  # duplicate key
    ],
)
def test_other_spellings_are_malformed(spelling: object) -> None:
    payload = dict(reversed(list(_valid_payload().items())))
    assert callable(spelling)
    text = PREFIX + b64(spelling(payload).encode())
    with pytest.raises(MalformedToken, match="canonical"):
        decode_token(text)


def test_non_finite_expiry_is_malformed() -> None:
    canonical = json.dumps(_valid_payload(), sort_keys=True, separators=(",", ":"))
    for constant in ("NaN", "Infinity", "-Infinity", "1e400"):
        body = canonical.replace(json.dumps(NOW + 3600.0), constant)
        with pytest.raises(MalformedToken, match="expires_at"):
            decode_token(PREFIX + b64(body.encode()))


def test_deep_nesting_is_malformed() -> None:
    with pytest.raises(MalformedToken):
        decode_token(PREFIX + b64(b"[" * 9000))


@given(st.text())
def test_decode_refuses_any_text(text: str) -> None:
    with pytest.raises(MalformedToken):
        decode_token(text)


@given(st.binary())
def test_decode_refuses_any_bytes_as_text(data: bytes) -> None:
    with pytest.raises(MalformedToken):
        decode_token(data.decode("latin-1"))
    with pytest.raises(MalformedToken):
        decode_token(PREFIX + b64(data))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(
    st.dictionaries(
        st.sampled_from(["name", "secret", "fingerprint", "join_addresses", "cluster_id", "expires_at"]), _JSON
    )
)
def test_decode_refuses_wrong_payloads(changes: dict[str, object]) -> None:
    payload = _valid_payload() | changes
    try:
        token = decode_token(text_of(payload))
    except MalformedToken:
        return
    assert encode_token(token) == text_of(payload)  # only a valid payload, in its canonical spelling


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = issued()[0]
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        character = draw(st.characters() | st.sampled_from("AZaz09-_.=+/"))
        if action == "insert":
            text = text[:position] + character + text[position:]
        elif action == "delete":
            text = text[:position] + text[position + 1 :]
        elif action == "replace":
            text = text[:position] + character + text[position + 1 :]
        else:
            text = text[:position]
    return text


@given(mutated())
def test_decode_of_mutated_tokens(text: str) -> None:
    try:
        token = decode_token(text)
    except MalformedToken as error:
        assert_discreet(error, issued()[0])
        if len(text) > 16:  # a short stump, "mgt1." say, may well be in a message
            assert_discreet(error, text)
        return
    assert encode_token(token) == text  # a mutation can land on another valid token, never on a different spelling


@given(
    name=st.from_regex(r"([a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\.){0,3}[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True),
    secret=st.binary(min_size=32, max_size=64),
    expires_at=st.floats(min_value=1e-3, max_value=1e12),
    addresses=st.lists(st.sampled_from((*ADDRESSES, "127.0.0.1:1", "[::1]:65535")), min_size=1, unique=True),
)
def test_round_trip_property(name: str, secret: bytes, expires_at: float, addresses: list[str]) -> None:
    token = JoinToken(name, secret, COORDINATOR, tuple(addresses), CLUSTER, expires_at)
    assert decode_token(encode_token(token)) == token


def test_verify_coordinator() -> None:
    token = decode_token(issued()[0])
    assert verify_coordinator(token, COORDINATOR)
    assert verify_coordinator(token, COORDINATOR.upper())
    assert not verify_coordinator(token, "d" * 64)
    assert not verify_coordinator(token, COORDINATOR[:-1])
    assert not verify_coordinator(token, "")
    assert not verify_coordinator(token, "ç" * 64)  # not ASCII: still a plain no


def test_token_expiry_as_the_joiner_sees_it() -> None:
    token = decode_token(issued()[0])
    assert not token.is_expired(NOW + 3599.999)
    assert token.is_expired(NOW + 3600.0)


# --- issue ----------------------------------------------------------------------------------------------------------


def test_issue() -> None:
    text, record = issued("n4.example", ttl=120.0)
    assert record == TokenRecord(
        name="n4.example",
        secret_digest=hashlib.sha256(SECRET).hexdigest(),
        expires_at=NOW + 120.0,
        issued_by="operator",
        issued_at=NOW,
        bound_fingerprint="",
        state=TokenState.ACTIVE,
    )
    token = decode_token(text)
    assert (token.name, token.expires_at, token.cluster_id) == ("n4.example", NOW + 120.0, CLUSTER)
    assert token.join_addresses == ADDRESSES
    assert token.coordinator_fingerprint == COORDINATOR


def test_issue_default_and_largest_ttl() -> None:
    assert issued(ttl=None)[1].expires_at == NOW + DEFAULT_TTL == NOW + 3600.0
    assert issued(ttl=MAX_TTL)[1].expires_at == NOW + 7 * 24 * 3600.0


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("nan"), float("inf"), MAX_TTL + 0.001])
def test_issue_refuses_bad_ttl(ttl: float) -> None:
    with pytest.raises(InvalidTokenRequest) as raised:
        issued(ttl=ttl)
    assert raised.value.field == "ttl"


def test_issue_refuses_bad_name() -> None:
    with pytest.raises(InvalidTokenRequest) as raised:
        issued("Node_1")
    assert raised.value.field == "name"
    assert raised.value.reason == "a member name must be lowercase"


@pytest.mark.parametrize(
    "change",
    [
        {"secret": bytes(31)},
        {"secret": bytes(65)},
        {"coordinator_fingerprint": "C" * 64},
        {"cluster_id": ""},
        {"join_addresses": ()},
        {"join_addresses": ("nowhere",)},
        {"issued_by": ""},
        {"now": float("nan")},
    ],
)
def test_issue_refuses_bad_configuration(change: dict[str, object]) -> None:
    arguments: dict[str, object] = {
        "secret": SECRET,
        "now": NOW,
        "ttl": 60.0,
        "issued_by": "operator",
        "coordinator_fingerprint": COORDINATOR,
        "cluster_id": CLUSTER,
        "join_addresses": ADDRESSES,
    } | change
    with pytest.raises(ValueError):
        issue("n4", **arguments)  # type: ignore[arg-type]


# --- the join check, in its order -----------------------------------------------------------------------------------


def join(
    text: str,
    record: TokenRecord | None,
    *,
    name: str = "n4",
    fingerprint: str = JOINER,
    dns_names: tuple[str, ...] = ("n4",),
    now: float = NOW + 10.0,
    cluster_id: str = CLUSTER,
) -> JoinToken:
    return check_join(
        text,
        name=name,
        certificate_fingerprint=fingerprint,
        certificate_dns_names=dns_names,
        record=record,
        now=now,
        cluster_id=cluster_id,
    )


def refused(kind: type[TokenRefused], text: str, record: TokenRecord | None, **kwargs: object) -> TokenRefused:
    with pytest.raises(kind) as raised:
        join(text, record, **kwargs)  # type: ignore[arg-type]
    error = raised.value
    assert type(error) is kind
    assert error.reason.isupper() and " " not in error.reason
    assert_discreet(error, text)
    return error


def test_join_accepted() -> None:
    text, record = issued()
    assert join(text, record) == decode_token(text)
    assert join(text, bind(record, JOINER)) == decode_token(text)  # the same joiner again
    assert join(text, record, dns_names=("other.example", "N4")) == decode_token(text)  # SANs compared ignoring case


def test_refused_1_malformed() -> None:
    text, record = issued()
    refused(MalformedToken, text[:-2], record)
    refused(MalformedToken, text + "A", record)


def test_refused_2_wrong_cluster() -> None:
    text, record = issued()
    error = refused(WrongCluster, text, record, cluster_id="another-cluster")
    assert error.metadata["token_cluster_id"] == CLUSTER


def test_refused_3_unknown_token() -> None:
    text, record = issued()
    refused(UnknownToken, text, None)
    refused(UnknownToken, text, replace(record, secret_digest=hashlib.sha256(OTHER_SECRET).hexdigest()))
    refused(UnknownToken, text, replace(record, name="n5"))  # a record for another name
    refused(UnknownToken, text, replace(record, secret_digest=""))
    # Before the state checks: a wrong secret learns nothing about the record's state.
    refused(UnknownToken, issued(secret=OTHER_SECRET)[0], revoke(record))


def test_refused_4_revoked() -> None:
    text, record = issued()
    refused(Revoked, text, revoke(record), now=NOW + 7200.0)  # before Expired


def test_refused_5_consumed() -> None:
    text, record = issued()
    refused(Consumed, text, consume(bind(record, JOINER)), now=NOW + 7200.0)  # before Expired


def test_refused_6_expired() -> None:
    text, record = issued()
    join(text, record, now=NOW + 3599.999)
    refused(Expired, text, record, now=NOW + 3600.0)  # now == expires_at is expired
    refused(Expired, text, record, now=NOW + 3600.0, name="n5")  # before NameMismatch
    # The record's expiry decides, not the token's.
    refused(Expired, text, replace(record, expires_at=NOW + 5.0))
    join(text, replace(record, expires_at=NOW + 7200.0), now=NOW + 3700.0)


def test_refused_7_name_mismatch() -> None:
    text, record = issued()
    error = refused(NameMismatch, text, record, name="n5", dns_names=("n5",))
    assert "n5" in str(error) and "n4" in str(error)
    refused(NameMismatch, text, record, name="n5", fingerprint=THIEF, dns_names=())  # before the later checks


def test_refused_7_name_mismatch_never_echoes_an_invalid_name() -> None:
    text, record = issued()
    error = refused(NameMismatch, text, record, name=text)  # the token pasted into the name field
    assert "not a valid member name" in str(error)
    refused(NameMismatch, text, record, name=b64(SECRET))


def test_refused_8_certificate_name_mismatch() -> None:
    text, record = issued()
    error = refused(CertificateNameMismatch, text, record, dns_names=("n5", "Bad_Name", "n4.example"))
    assert "n5, n4.example" in str(error) and "Bad_Name" not in str(error)
    refused(CertificateNameMismatch, text, record, dns_names=())
    refused(CertificateNameMismatch, text, record, dns_names=("*.n4", "n4."))  # no wildcard, no root dot
    refused(CertificateNameMismatch, text, bind(record, JOINER), fingerprint=THIEF, dns_names=())  # before binding


def test_refused_9_bound_to_another_certificate() -> None:
    text, record = issued()
    error = refused(BoundToAnotherCertificate, text, bind(record, JOINER), fingerprint=THIEF)
    assert error.metadata["bound_certificate_fingerprint"] == JOINER


def test_released_token_serves_another_certificate() -> None:
    text, record = issued()
    assert join(text, release(bind(record, JOINER)), fingerprint=THIEF) == decode_token(text)


# --- state changes --------------------------------------------------------------------------------------------------


def test_bind() -> None:
    _, record = issued()
    bound = bind(record, JOINER)
    assert bound == replace(record, bound_fingerprint=JOINER)
    assert bind(bound, JOINER) is bound  # idempotent
    with pytest.raises(BoundToAnotherCertificate):
        bind(bound, THIEF)
    with pytest.raises(ValueError):
        bind(record, "not a fingerprint")
    with pytest.raises(Revoked):
        bind(revoke(record), JOINER)
    with pytest.raises(Consumed):
        bind(consume(bound), JOINER)


def test_consume() -> None:
    _, record = issued()
    bound = bind(record, JOINER)
    consumed = consume(bound)
    assert consumed == replace(bound, state=TokenState.CONSUMED)
    assert consume(consumed) is consumed  # a replayed step
    with pytest.raises(IllegalTokenTransition):
        consume(record)  # no join bound to it
    with pytest.raises(Revoked):
        consume(revoke(record))
    assert consume(replace(bound, expires_at=NOW)).state is TokenState.CONSUMED  # expiry was checked at reserve


def test_release() -> None:
    _, record = issued()
    bound = bind(record, JOINER)
    assert release(bound) == record
    assert release(record) is record
    revoked = revoke(record)
    assert release(revoked) is revoked  # revocation wins over a rollback
    with pytest.raises(IllegalTokenTransition):
        release(consume(bound))


def test_revoke() -> None:
    _, record = issued()
    revoked = revoke(record)
    assert revoked == replace(record, state=TokenState.REVOKED)
    assert revoke(revoked) is revoked
    with pytest.raises(TokenInUse):
        revoke(bind(record, JOINER))
    with pytest.raises(Consumed):
        revoke(consume(bind(record, JOINER)))
    assert revoke(release(bind(record, JOINER))).state is TokenState.REVOKED


def test_transition_errors_are_discreet() -> None:
    text, record = issued()
    for attempt in (
        lambda: consume(record),
        lambda: release(consume(bind(record, JOINER))),
        lambda: revoke(bind(record, JOINER)),
        lambda: bind(bind(record, JOINER), THIEF),
    ):
        with pytest.raises(TokenRefused) as raised:
            attempt()
        assert_discreet(raised.value, text)


def test_record_expiry() -> None:
    _, record = issued()
    assert not record.is_expired(NOW + 3599.999)
    assert record.is_expired(NOW + 3600.0)


def test_info_never_shows_the_digest() -> None:
    _, record = issued()
    assert info(bind(record, JOINER)) == TokenInfo("n4", NOW + 3600.0, JOINER, "operator")
    assert info(record).bound_certificate_fingerprint == ""


# --- member names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("n1", None),
        ("node-1.cluster.example", None),
        ("a", None),
        ("1node", None),
        ("xn--bcher-kva.example", None),
        ("a" * 63, None),
        (".".join(["a" * 63] * 3 + ["a" * 61]), None),  # 253 characters
        (".".join(["a" * 63] * 3 + ["a" * 62]), "must be at most 253 characters"),
        ("", "must not be empty"),
        ("N1", "must be lowercase"),
        ("node.Example", "must be lowercase"),
        ("n1.", "must not end with a dot"),
        (".n1", "label 1 is empty"),
        ("n1..example", "label 2 is empty"),
        ("a" * 64, "label 1 is longer than 63 characters"),
        ("-n1", "label 1 must not start or end with a hyphen"),
        ("n1-", "label 1 must not start or end with a hyphen"),
        ("n1.-x", "label 2 must not start or end with a hyphen"),
        ("node_1", "label 1 may hold only lowercase letters, digits and hyphens"),
        ("n 1", "label 1 may hold only"),
        ("*.example", "label 1 may hold only"),
        ("nöde", "label 1 may hold only"),
        ("n1\n", "label 1 may hold only"),
        ("10.0.0.1", "must not end with an all-digit label"),
        ("1234", "must not end with an all-digit label"),
        ("n1.123", "must not end with an all-digit label"),
        ("n1:7000", "label 1 may hold only"),
    ],
)
def test_dns_names(name: str, problem: str | None) -> None:
    found = dns_name_problem(name)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)
        assert name not in found or not name


def test_dns_name_not_text() -> None:
    assert dns_name_problem(None) == "must be a string"
