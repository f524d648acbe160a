"""Join tokens: their text form, their stored record, the join check and the record's state changes.

Pure: no I/O, no clock and no randomness. The caller passes `now` (seconds since the Unix epoch) and the random
secret (`secrets.token_bytes(32)`), and stores the records.

**The token text** is `mgt1.` followed by the unpadded base64url of a canonical JSON object (sorted keys, no spaces,
ASCII only); the prefix is the format's version. Its fields:

    name            the member name it was issued for (a DNS name, see `dns_name_problem`)
    secret          the secret, 32 to 64 random bytes, unpadded base64url
    fingerprint     the coordinator certificate's SHA-256 fingerprint (64 lowercase hex digits): the joiner's only
                    trust anchor, since the join listener does not ask for client certificates (`verify_coordinator`)
    join_addresses  where the coordinator's join listener answers, "host:port" ("[v6]:port"), 1 to 32, no duplicates
    cluster_id      the cluster's identity: an opaque string of 1 to 64 characters from [A-Za-z0-9._-], starting with
                    a letter or digit. The coordinator generates it once (a random UUID) when it creates its journal and
                    keeps it; a token from another cluster, or from another coordinator's journal, carries another one.
    expires_at      when it stops being usable, seconds since the Unix epoch (a JSON number with a fraction or exponent)

A text decodes only if it is exactly what `encode_token` makes of the decoded token: any other spelling of the same
fields (padding, whitespace, key order, an escaped character, an integer expiry) is malformed, so a token has one text.

**The record** the coordinator stores keeps the SHA-256 digest of the secret, never the secret: the secret is 32 or more
random bytes, so a plain digest cannot be reversed and no slow hash is needed. A record's life:

    ACTIVE, unbound ──bind(fp)──► ACTIVE, bound to fp ──consume──► CONSUMED (final; the join passed its commit point)
          ▲  │                         │
          │  └──revoke──► REVOKED      └──release (rollback)──► ACTIVE, unbound
          └────────────────────────────┘

`bind`, `consume`, `release` and `revoke` are idempotent where a journal step may be replayed. A bound token (a join
in flight) cannot be revoked: its join either consumes it or, rolled back, releases it, and then it can be revoked.

**Errors.** Every refusal is a `TokenRefused` with an UPPER_SNAKE `reason` (for google.rpc.ErrorInfo), `metadata`
(str → str, for the same) and a message naming only values that were validated first (DNS names, cluster ids,
fingerprints): never the secret, its digest, or the token text. `InvalidTokenRequest` is a bad request field when
issuing. Arguments that only the coordinator itself supplies (secret, fingerprint, cluster id, addresses) raise
`ValueError` when wrong: that is a bug or a misconfiguration, not a refusal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum

from coordinator.core.addresses import address_problem

PREFIX = "mgt1."
DEFAULT_TTL = 3600.0  # seconds, when IssueTokenOperation.ttl is unset
MAX_TTL = 7 * 24 * 3600.0
MIN_SECRET_BYTES = 32
MAX_SECRET_BYTES = 64
MAX_JOIN_ADDRESSES = 32
MAX_NAME_LENGTH = 253
# Longer than any token `encode_token` can make (32 addresses of at most 263 characters, a 253-character name):
# a longer text is refused before any decoding work.
MAX_TOKEN_LENGTH = 16384

_FIELDS = ("cluster_id", "expires_at", "fingerprint", "join_addresses", "name", "secret")
_VERSIONED = re.compile(r"[a-z]{2,8}[0-9]{1,4}\.")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_CLUSTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL_CHARACTERS = re.compile(r"[a-z0-9-]+")
_DIGITS = re.compile(r"[0-9]+")
_UPPERCASE = re.compile(r"[A-Z]")

# --- errors ---------------------------------------------------------------------------------------------------------


class TokenError(Exception):
    """Base of this module's errors."""


class InvalidTokenRequest(TokenError):
    """A field of an issue request is invalid: maps to a google.rpc.BadRequest FieldViolation(field, reason).

    `reason` here is the sentence describing the violation (not an ErrorInfo reason)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class TokenRefused(TokenError):
    """A token cannot be used (or its record cannot change) as asked. Never names the secret or the token text."""

    reason = "TOKEN_REFUSED"

    def __init__(self, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: Mapping[str, str] = dict(metadata or {})


class MalformedToken(TokenRefused):
    reason = "TOKEN_MALFORMED"


class WrongCluster(TokenRefused):
    reason = "TOKEN_WRONG_CLUSTER"


class UnknownToken(TokenRefused):
    reason = "TOKEN_UNKNOWN"


class Revoked(TokenRefused):
    reason = "TOKEN_REVOKED"


class Consumed(TokenRefused):
    reason = "TOKEN_CONSUMED"


class Expired(TokenRefused):
    reason = "TOKEN_EXPIRED"


class NameMismatch(TokenRefused):
    reason = "TOKEN_NAME_MISMATCH"


class CertificateNameMismatch(TokenRefused):
    reason = "CERTIFICATE_NAME_MISMATCH"


class BoundToAnotherCertificate(TokenRefused):
    reason = "TOKEN_BOUND_TO_ANOTHER_CERTIFICATE"


class TokenInUse(TokenRefused):
    """Revoking a token that a join in flight is bound to."""

    reason = "TOKEN_IN_USE"


class IllegalTokenTransition(TokenRefused):
    """A state change the record's state does not allow (consuming an unbound token, releasing a consumed one)."""

    reason = "TOKEN_ILLEGAL_TRANSITION"


# --- validation -----------------------------------------------------------------------------------------------------


def dns_name_problem(name: object) -> str | None:
    """Why `name` is not a member name, or None if it is one. The sentence never repeats the name.

    A member name is a DNS host name (RFC 1123) spelled one way only: labels of 1 to 63 lowercase letters, digits and
    hyphens, neither starting nor ending with a hyphen, joined by dots, at most 253 characters, without the root's
    trailing dot, and not ending in an all-digit label (that reads as an IPv4 address; RFC 1123 §2.1). Uppercase is
    refused rather than folded: the name is compared exactly with the members table and names truststore files, so
    "N1" and "n1" must not both be possible. A single label ("n1") is a name.
    """
    if not isinstance(name, str):
        return "must be a string"
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters"
    if _UPPERCASE.search(name):
        return "must be lowercase"
    if name.endswith("."):
        return "must not end with a dot"
    labels = name.split(".")
    for number, label in enumerate(labels, 1):
        if not label:
            return f"label {number} is empty"
        if len(label) > 63:
            return f"label {number} is longer than 63 characters"
        if not _LABEL_CHARACTERS.fullmatch(label):
            return f"label {number} may hold only lowercase letters, digits and hyphens"
        if label.startswith("-") or label.endswith("-"):
            return f"label {number} must not start or end with a hyphen"
    if _DIGITS.fullmatch(labels[-1]):
        return "must not end with an all-digit label (it would read as an IP address)"
    return None


def _token_problem(token: JoinToken) -> str | None:
    """What is wrong with a token's fields, naming the field and never its value."""
    problem = dns_name_problem(token.name)
    if problem is not None:
        return f"name {problem}"
    if not isinstance(token.secret, bytes) or not MIN_SECRET_BYTES <= len(token.secret) <= MAX_SECRET_BYTES:
        return f"secret must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes"
    if not isinstance(token.coordinator_fingerprint, str) or not _FINGERPRINT.fullmatch(token.coordinator_fingerprint):
        return "fingerprint must be 64 lowercase hex digits (a SHA-256)"
    if not isinstance(token.join_addresses, tuple) or not 1 <= len(token.join_addresses) <= MAX_JOIN_ADDRESSES:
        return f"join_addresses must hold 1 to {MAX_JOIN_ADDRESSES} addresses"
    for number, address in enumerate(token.join_addresses, 1):
        problem = address_problem(address)
        if problem is not None:
            return f"join address {number} {problem}"
    if len(set(token.join_addresses)) != len(token.join_addresses):
        return "join_addresses holds a duplicate"
    if not isinstance(token.cluster_id, str) or not _CLUSTER_ID.fullmatch(token.cluster_id):
        return "cluster_id must be 1 to 64 characters from [A-Za-z0-9._-], starting with a letter or digit"
    expires_at: object = token.expires_at
    if not isinstance(expires_at, float) or not math.isfinite(expires_at) or expires_at <= 0:
        return "expires_at must be a positive finite number"
    return None


def _fingerprint_problem(fingerprint: object) -> str | None:
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        return "a certificate fingerprint must be 64 lowercase hex digits (a SHA-256)"
    return None


def _digest(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two strings (of any characters; compare_digest takes only ASCII str)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def _when(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return f"{timestamp} s after the epoch"


# --- the token text -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinToken:
    """A decoded token. Its repr leaves the secret out. Constructing one validates it (ValueError)."""

    name: str
    secret: bytes = field(repr=False)
    coordinator_fingerprint: str
    join_addresses: tuple[str, ...]
    cluster_id: str
    expires_at: float

    def __post_init__(self) -> None:
        expires_at: object = self.expires_at
        if isinstance(expires_at, int) and not isinstance(expires_at, bool):
            object.__setattr__(self, "expires_at", float(expires_at))
        problem = _token_problem(self)
        if problem is not None:
            raise ValueError(problem)

    @property
    def secret_digest(self) -> str:
        """SHA-256 of the secret, lowercase hex: what the record stores."""
        return _digest(self.secret)

    def is_expired(self, now: float) -> bool:
        """As the token says (the joiner's view; the coordinator decides by its record). Expired at expires_at."""
        return now >= self.expires_at


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Unpadded base64url, in its one canonical spelling (ValueError otherwise)."""
    if not _BASE64URL.fullmatch(text):
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


def encode_token(token: JoinToken) -> str:
    payload = {
        "cluster_id": token.cluster_id,
        "expires_at": token.expires_at,
        "fingerprint": token.coordinator_fingerprint,
        "join_addresses": list(token.join_addresses),
        "name": token.name,
        "secret": _b64encode(token.secret),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return PREFIX + _b64encode(text.encode("ascii"))


def decode_token(text: object) -> JoinToken:
    """The token `text` spells, or MalformedToken if it is not exactly a valid token."""
    if not isinstance(text, str):
        raise MalformedToken("The join token is malformed: it is not text.")
    if len(text) > MAX_TOKEN_LENGTH:
        raise MalformedToken(f"The join token is malformed: it is longer than {MAX_TOKEN_LENGTH} characters.")
    if not text.startswith(PREFIX):
        if _VERSIONED.match(text):
            raise MalformedToken(
                f"The join token is malformed: its version is not supported (this coordinator reads {PREFIX!r})."
            )
        raise MalformedToken(f"The join token is malformed: it does not start with {PREFIX!r}.")
    try:
        raw = _b64decode(text[len(PREFIX) :])
    except (ValueError, binascii.Error):
        raise MalformedToken("The join token is malformed: its body is not base64url.") from None
    try:
        payload: object = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise MalformedToken("The join token is malformed: its body is not JSON.") from None
    token = _from_payload(payload)
    if encode_token(token) != text:
        raise MalformedToken("The join token is malformed: it is not in its canonical form.")
    return token


def _from_payload(payload: object) -> JoinToken:
    def malformed(detail: str) -> MalformedToken:
        return MalformedToken(f"The join token is malformed: {detail}.")

    if not isinstance(payload, dict):
        raise malformed("its body is not a JSON object")
    missing = [key for key in _FIELDS if key not in payload]
    if missing:
        raise malformed(f"it lacks {', '.join(missing)}")
    if len(payload) != len(_FIELDS):
        raise malformed(f"it has {len(payload) - len(_FIELDS)} unknown field(s)")
    for key in ("cluster_id", "fingerprint", "name", "secret"):
        if not isinstance(payload[key], str):
            raise malformed(f"{key} is not a string")
    addresses = payload["join_addresses"]
    if not isinstance(addresses, list) or not all(isinstance(address, str) for address in addresses):
        raise malformed("join_addresses is not a list of strings")
    expires_at = payload["expires_at"]
    if not isinstance(expires_at, float):
        raise malformed("expires_at is not a number with a fraction")
    try:
        secret = _b64decode(payload["secret"])
    except (ValueError, binascii.Error):
        raise malformed("secret is not base64url") from None
    try:
        return JoinToken(
            name=payload["name"],
            secret=secret,
            coordinator_fingerprint=payload["fingerprint"],
            join_addresses=tuple(addresses),
            cluster_id=payload["cluster_id"],
            expires_at=expires_at,
        )
    except ValueError as problem:  # the message names the field, never its value
        raise malformed(str(problem)) from None


def verify_coordinator(token: JoinToken, presented_fingerprint: str) -> bool:
    """Whether the certificate a join address presented is the coordinator's the token pins (constant time).

    The joiner calls this before sending anything, on every address it dials; case is ignored."""
    return _same(token.coordinator_fingerprint, presented_fingerprint.lower())


# --- the stored record ----------------------------------------------------------------------------------------------


class TokenState(Enum):
    ACTIVE = "ACTIVE"  # usable (unbound), or held by a join in flight (bound)
    CONSUMED = "CONSUMED"  # its join passed the commit point: final
    REVOKED = "REVOKED"  # revoked by an operator: final


@dataclass(frozen=True)
class TokenRecord:
    """What the coordinator stores for an issued token. Its repr leaves the digest out."""

    name: str
    secret_digest: str = field(repr=False)
    expires_at: float
    issued_by: str
    issued_at: float
    bound_fingerprint: str = ""  # "" = unbound
    state: TokenState = TokenState.ACTIVE

    def is_expired(self, now: float) -> bool:
        """Expired from expires_at on (now == expires_at is expired)."""
        return now >= self.expires_at


@dataclass(frozen=True)
class TokenInfo:
    """A record as ListTokens shows it (memberguard.v1.TokenInfo): never the secret nor its digest."""

    name: str
    expires_at: float
    bound_certificate_fingerprint: str
    issued_by: str


def info(record: TokenRecord) -> TokenInfo:
    return TokenInfo(record.name, record.expires_at, record.bound_fingerprint, record.issued_by)


def checked_request(name: str, ttl: float | None) -> float:
    """The ttl a request for a token for name asks for (None = DEFAULT_TTL), or InvalidTokenRequest."""
    problem = dns_name_problem(name)
    if problem is not None:
        raise InvalidTokenRequest("name", f"a member name {problem}")
    if ttl is None:
        ttl = DEFAULT_TTL
    if not math.isfinite(ttl) or ttl <= 0:
        raise InvalidTokenRequest("ttl", "must be positive")
    if ttl > MAX_TTL:
        raise InvalidTokenRequest("ttl", "must be at most 7 days")
    return ttl


def issue(
    name: str,
    secret: bytes,
    *,
    now: float,
    ttl: float | None,
    issued_by: str,
    coordinator_fingerprint: str,
    cluster_id: str,
    join_addresses: Iterable[str],
) -> tuple[str, TokenRecord]:
    """A new token for `name`: its text (for the caller, once) and the record to store.

    `name` and `ttl` (seconds; None = DEFAULT_TTL) come from the request: InvalidTokenRequest when wrong. The other
    arguments are the coordinator's own: ValueError when wrong. Whether a token for `name` already exists (replace it,
    or refuse) is the caller's policy; the record is found by name (see `check_join`)."""
    ttl = checked_request(name, ttl)
    if not isinstance(issued_by, str) or not issued_by:
        raise ValueError("issued_by must name who issues the token")
    if not math.isfinite(now):
        raise ValueError("now must be finite")
    token = JoinToken(
        name=name,
        secret=secret,
        coordinator_fingerprint=coordinator_fingerprint,
        join_addresses=tuple(join_addresses),
        cluster_id=cluster_id,
        expires_at=float(now + ttl),
    )
    record = TokenRecord(
        name=name,
        secret_digest=token.secret_digest,
        expires_at=token.expires_at,
        issued_by=issued_by,
        issued_at=float(now),
    )
    return encode_token(token), record


# --- the join check -------------------------------------------------------------------------------------------------


def authenticates(text: str, record: TokenRecord | None) -> bool:
    """Whether the token text is the one stored in `record` (its name and secret), whatever the record's state: a
    joiner that retries a join after its token was consumed is still the holder of that token. Malformed text does
    not authenticate."""
    try:
        token = decode_token(text)
    except MalformedToken:
        return False
    return record is not None and record.name == token.name and _same(record.secret_digest, token.secret_digest)


def check_join(
    text: str,
    *,
    name: str,
    certificate_fingerprint: str,
    certificate_dns_names: Iterable[str],
    record: TokenRecord | None,
    now: float,
    cluster_id: str,
) -> JoinToken:
    """Whether a join may use this token, checked in this order, each failure its own TokenRefused:

    1. MalformedToken              the text is not exactly a token
    2. WrongCluster                the token names another cluster (or another coordinator's journal)
    3. UnknownToken                no record, or the record is for another name, or the secret's digest differs
    4. Revoked, 5. Consumed        the record's state
    6. Expired                     now >= the record's expires_at (the record's, not the token's)
    7. NameMismatch                the token's name is not the requested name
    8. CertificateNameMismatch     the name is not among the certificate's DNS names (compared ignoring case)
    9. BoundToAnotherCertificate   an earlier join bound the token to another certificate

    `record` is the stored record for the token's name, `decode_token(text).name` (or None). Looked up by the
    requested name instead, a token for another name is refused as UnknownToken rather than NameMismatch: still safe.
    On success the caller binds the record to the certificate (`bind`) under the same lock.
    """
    token = decode_token(text)
    if token.cluster_id != cluster_id:
        raise WrongCluster(
            f"The join token was issued for cluster {token.cluster_id!r}, not this cluster ({cluster_id!r}): it comes "
            "from another cluster or another coordinator.",
            {"name": token.name, "token_cluster_id": token.cluster_id, "cluster_id": cluster_id},
        )
    known = record is not None and record.name == token.name
    matches = record is not None and _same(record.secret_digest, token.secret_digest)
    if record is None or not (known and matches):
        raise UnknownToken(
            f"No outstanding join token for {token.name} matches this one: it was not issued by this coordinator, "
            "or it was deleted or replaced.",
            {"name": token.name},
        )
    if record.state is TokenState.REVOKED:
        raise Revoked(f"The join token for {token.name} was revoked; issue a new one.", {"name": token.name})
    if record.state is TokenState.CONSUMED:
        raise Consumed(
            f"The join token for {token.name} was already used by a completed join; issue a new one to join again.",
            {"name": token.name},
        )
    if record.is_expired(now):
        raise Expired(
            f"The join token for {token.name} expired at {_when(record.expires_at)}; issue a new one.",
            {"name": token.name, "expires_at": _when(record.expires_at)},
        )
    if name != token.name:
        if dns_name_problem(name) is None:
            raise NameMismatch(
                f"The join token was issued for {token.name}, not {name}.", {"name": name, "token_name": token.name}
            )
        raise NameMismatch(
            f"The join token was issued for {token.name}, not for the requested name, which is not a valid member "
            f"name: it {dns_name_problem(name)}.",
            {"token_name": token.name},
        )
    dns_names = [dns_name for dns_name in certificate_dns_names if isinstance(dns_name, str)]
    if name not in (dns_name.lower() for dns_name in dns_names):
        shown = [dns_name for dns_name in dns_names if dns_name_problem(dns_name) is None][:8]
        listing = ", ".join(shown) if shown else "none that is a member name"
        raise CertificateNameMismatch(
            f"{name} is not among the DNS names of the joiner's certificate ({listing}); make the certificate for "
            f"{name}, or use a token issued for one of its names.",
            {"name": name},
        )
    if record.bound_fingerprint and not _same(record.bound_fingerprint, certificate_fingerprint):
        raise BoundToAnotherCertificate(
            f"The join token for {name} is bound to the certificate {record.bound_fingerprint} by an earlier join, "
            "not to this one: a token serves only the certificate that first used it.",
            {"name": name, "bound_certificate_fingerprint": record.bound_fingerprint},
        )
    return token


# --- state changes --------------------------------------------------------------------------------------------------


def _refuse_final(record: TokenRecord, doing: str) -> None:
    if record.state is TokenState.REVOKED:
        raise Revoked(f"Cannot {doing} the join token for {record.name}: it was revoked.", {"name": record.name})
    if record.state is TokenState.CONSUMED:
        raise Consumed(
            f"Cannot {doing} the join token for {record.name}: a completed join already used it.",
            {"name": record.name},
        )


def bind(record: TokenRecord, fingerprint: str) -> TokenRecord:
    """Bind an active token to the joiner's certificate on its first use; the same certificate again is a no-op."""
    problem = _fingerprint_problem(fingerprint)
    if problem is not None:
        raise ValueError(problem)
    _refuse_final(record, "bind")
    if not record.bound_fingerprint:
        return replace(record, bound_fingerprint=fingerprint)
    if _same(record.bound_fingerprint, fingerprint):
        return record
    raise BoundToAnotherCertificate(
        f"The join token for {record.name} is bound to the certificate {record.bound_fingerprint}, not {fingerprint}.",
        {"name": record.name, "bound_certificate_fingerprint": record.bound_fingerprint},
    )


def consume(record: TokenRecord) -> TokenRecord:
    """At the join's commit point: the bound token is used up. Consuming a consumed token is a no-op (a replayed
    step). Expiry is not checked: the join was authorized when it reserved."""
    if record.state is TokenState.CONSUMED:
        return record
    _refuse_final(record, "consume")
    if not record.bound_fingerprint:
        raise IllegalTokenTransition(
            f"Cannot consume the join token for {record.name}: no join is bound to it.", {"name": record.name}
        )
    return replace(record, state=TokenState.CONSUMED)


def release(record: TokenRecord) -> TokenRecord:
    """On a rollback before the commit point: the token is active and unbound again, so the same joiner, or a fixed
    one with another certificate, can retry. A revoked token stays revoked; a consumed one cannot be released."""
    if record.state is TokenState.REVOKED:
        return record
    if record.state is TokenState.CONSUMED:
        raise IllegalTokenTransition(
            f"Cannot release the join token for {record.name}: its join passed the commit point.",
            {"name": record.name},
        )
    if not record.bound_fingerprint:
        return record
    return replace(record, bound_fingerprint="")


def revoke(record: TokenRecord) -> TokenRecord:
    """An operator revokes an unused token; revoking a revoked one is a no-op. A token bound to a join in flight is
    TokenInUse (the join consumes or releases it); a consumed one is Consumed (remove the member instead)."""
    if record.state is TokenState.REVOKED:
        return record
    if record.state is TokenState.CONSUMED:
        raise Consumed(
            f"Cannot revoke the join token for {record.name}: a completed join already used it; remove the member "
            "instead.",
            {"name": record.name},
        )
    if record.bound_fingerprint:
        raise TokenInUse(
            f"Cannot revoke the join token for {record.name}: a join in flight holds it; it is released if that join "
            "rolls back.",
            {"name": record.name, "bound_certificate_fingerprint": record.bound_fingerprint},
        )
    return replace(record, state=TokenState.REVOKED)
