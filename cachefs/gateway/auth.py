"""Authentication of the read gateway's requests: AWS Signature V4 (S3), bearer token, anonymous.

- `AuthError` is every refusal: an S3 error ``code`` and an HTTP ``status`` (400 for malformed
  credentials, 403 otherwise). Its message never holds a secret, a token or a signature.
- `KeyFile` maps access key ids to secrets, read from a TOML (``.toml``) or JSON file, either flat
  (``AKID = "secret"``) or under a ``keys`` table; `TokenFile` holds one bearer token. Both are
  re-read when the file's (mtime, size, inode) changes, looked at most every ``check_interval``
  seconds; a reload that fails keeps what was loaded before (and logs a warning). Replace the
  files atomically (write a new one, rename it over the old one).
- `verify_sigv4` checks an S3 SigV4 request, either form: the ``Authorization: AWS4-HMAC-SHA256``
  header (``x-amz-date`` or ``date`` within 15 minutes of now) or a presigned URL
  (``X-Amz-Algorithm``, ... ``X-Amz-Signature`` in the query; expired after ``X-Amz-Expires``).
  Any region is accepted (the gateway is region-agnostic); the service must be ``s3``.
- `Authenticator` picks the scheme a request carries and returns its principal.

The canonical request is built from the path and query as they came on the wire: the path's
percent-escapes are decoded and every byte re-encoded except ``A-Za-z0-9-._~/`` (hex upper case);
query names and values the same way with ``/`` encoded too, after ``+`` is read as a space (form
decoding). The gateway must decode the path (percent only, ``+`` stays ``+``) and the query (form
decoding) that same way, so what was signed is what is served. A request whose client encoded
differently but signed exactly the bytes it sent is accepted too (the literal form is tried when
the normalised one fails). The payload hash is taken from ``x-amz-content-sha256`` as is (the hash
of an empty body when absent): the read gateway ignores request bodies, so it is never checked.
Header values are taken as the caller gives them (decoded text): a signed header holding non-ASCII
bytes verifies only if the caller decoded them as UTF-8.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote, unquote_to_bytes

from cachefs.errors import ConfigError, PermissionDenied

log = logging.getLogger("cachefs.gateway.auth")

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
TERMINATOR = "aws4_request"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_SKEW_S = 15 * 60
MAX_EXPIRES_S = 7 * 24 * 3600

ANONYMOUS = "anonymous"
TOKEN = "token"

_BAD_REQUEST_CODES = frozenset(
    {"AuthorizationHeaderMalformed", "AuthorizationQueryParametersError", "InvalidArgument"})

# Access key ids: printable ASCII without '/' (the credential scope's separator) and ',' (the
# Authorization header's), at most 128 characters.
_ACCESS_KEY_ID = re.compile(r"[!-+\-.0-~]{1,128}")
_REGION = re.compile(r"[!-.0-~]{1,64}")
_SCOPE_DATE = re.compile(r"\d{8}")
_AMZ_DATE = re.compile(r"\d{8}T\d{6}Z")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_EXPIRES = re.compile(r"\d{1,7}")
_SCHEME = re.compile(r"[A-Za-z0-9._~+-]{1,40}")

_Q_ALGORITHM = "X-Amz-Algorithm"
_Q_CREDENTIAL = "X-Amz-Credential"
_Q_DATE = "X-Amz-Date"
_Q_EXPIRES = "X-Amz-Expires"
_Q_SIGNED_HEADERS = "X-Amz-SignedHeaders"
_Q_SIGNATURE = "X-Amz-Signature"
_QUERY_AUTH_PARAMS = frozenset(
    {_Q_ALGORITHM, _Q_CREDENTIAL, _Q_DATE, _Q_EXPIRES, _Q_SIGNED_HEADERS, _Q_SIGNATURE})


class AuthError(PermissionDenied):
    """A request's credentials were refused: ``code`` is the S3 error code, ``status`` the HTTP
    status (400 for malformed credentials, 403 otherwise unless given); ``s3_code`` and
    ``http_status`` (what every CachefsError carries) say the same."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else (
            400 if code in _BAD_REQUEST_CODES else 403)
        self.s3_code = self.code
        self.http_status = self.status


# --------------------------------------------------------------------------- watched files

T = TypeVar("T")
_Stamp = tuple[int, int, int]


class _WatchedFile(Generic[T]):
    """A file parsed at construction and re-parsed when its (st_mtime_ns, st_size, st_ino)
    changes, looked at most every ``check_interval`` seconds of ``clock``."""

    what = "file"

    def __init__(self, path: str | os.PathLike[str], check_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()
        try:
            stamp = self._stamp()
            value = self._load()
        except OSError as e:
            raise ConfigError(f"{self.what} {self.path}: cannot read it: "
                              f"{e.strerror or type(e).__name__}") from e
        except ValueError as e:
            raise ConfigError(f"{self.what} {self.path}: {e}") from e
        self._value: T = value
        self._seen: _Stamp | None = stamp
        self._next_check = clock() + check_interval

    def _parse(self, data: bytes) -> T:
        raise NotImplementedError

    def _describe(self, value: T) -> str:
        return "reloaded"

    def _stamp(self) -> _Stamp:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> T:
        return self._parse(self.path.read_bytes())

    def current(self) -> T:
        """The loaded value, re-read first if the check interval passed and the file changed."""
        if self._clock() >= self._next_check:
            with self._lock:
                now = self._clock()
                if now >= self._next_check:
                    self._refresh()
                    self._next_check = self._clock() + self._interval
        return self._value

    def _refresh(self) -> None:
        try:
            stamp: _Stamp | None = self._stamp()
        except OSError as e:
            if self._seen is not None:
                log.warning("%s %s: cannot stat it (%s); keeping the previous contents",
                            self.what, self.path, e.strerror or type(e).__name__)
            self._seen = None
            return
        if stamp == self._seen:
            return
        self._seen = stamp
        try:
            value = self._load()
        except OSError as e:
            log.warning("%s %s: cannot read it (%s); keeping the previous contents",
                        self.what, self.path, e.strerror or type(e).__name__)
            return
        except ValueError as e:
            log.warning("%s %s: %s; keeping the previous contents", self.what, self.path, e)
            return
        self._value = value
        log.info("%s %s: %s", self.what, self.path, self._describe(value))


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None


class KeyFile(_WatchedFile[dict[str, str]]):
    """Access key id -> secret, from a TOML file (``.toml``) or else JSON: a flat table
    ``{"AKID": "secret"}`` or ``{"keys": {"AKID": "secret"}}``. Re-read on change (see the module
    docstring); a missing or malformed file at construction is a ConfigError."""

    what = "key file"

    def secret(self, access_key_id: str) -> str | None:
        """The secret of ``access_key_id``, None if the file does not hold it."""
        return self.current().get(access_key_id)

    def _describe(self, value: dict[str, str]) -> str:
        return f"reloaded, {len(value)} access keys"

    def _parse(self, data: bytes) -> dict[str, str]:
        text = _decode_text(data)
        try:
            doc: Any = (tomllib.loads(text) if self.path.suffix.lower() == ".toml"
                        else json.loads(text))
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            # Both messages give a position only, never the text around it.
            raise ValueError(f"cannot parse it: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError("it must be a table of access key id -> secret")
        table: Any = doc
        if isinstance(doc.get("keys"), dict):
            if len(doc) != 1:
                raise ValueError("it has a 'keys' table and other entries: put every access key "
                                 "in the 'keys' table")
            table = doc["keys"]
        keys: dict[str, str] = {}
        for n, (access_key_id, secret) in enumerate(table.items(), 1):
            if not isinstance(access_key_id, str) or not _ACCESS_KEY_ID.fullmatch(access_key_id):
                # Not echoed: a mangled file may hold a secret where an id belongs.
                raise ValueError(f"entry {n}: an access key id must be 1-128 printable ASCII "
                                 "characters without '/', ',' or spaces")
            if access_key_id in (ANONYMOUS, TOKEN):
                raise ValueError(f"entry {n}: {access_key_id!r} is reserved (a principal name)")
            if not isinstance(secret, str) or not secret:
                raise ValueError(f"access key {access_key_id}: the secret must be a non-empty "
                                 "string")
            keys[access_key_id] = secret
        return keys


class TokenFile(_WatchedFile[str]):
    """One bearer token, the file's text with surrounding whitespace stripped. Re-read on change
    (see the module docstring); a missing or empty file at construction is a ConfigError."""

    what = "token file"

    def token(self) -> str:
        return self.current()

    def check(self, header_value: str | None) -> None:
        """Refuse (AccessDenied) unless ``header_value`` is exactly ``Bearer <token>``."""
        if header_value is None:
            raise AuthError("AccessDenied", "A bearer token is required")
        expected = f"Bearer {self.current()}".encode("utf-8", "surrogateescape")
        got = header_value.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(got, expected):
            raise AuthError("AccessDenied", "The bearer token was refused")

    def _describe(self, value: str) -> str:
        return "reloaded the token"

    def _parse(self, data: bytes) -> str:
        token = _decode_text(data).strip()
        if not token:
            raise ValueError("the file is empty")
        if not token.isprintable():
            raise ValueError("the token spans several lines or holds control characters")
        return token


# --------------------------------------------------------------------------- SigV4

@dataclass(frozen=True)
class _Credentials:
    """What a SigV4 request claims, parsed from its Authorization header or its query."""

    access_key_id: str
    scope_date: str
    region: str
    signed_headers: tuple[str, ...]
    signature: str
    amz_date: str
    payload_hash: str
    presigned: bool


def _lower_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Header name (lower case) -> its values in order; takes a mapping or an ``items()``-like
    list (an ``http.client.HTTPMessage`` gives repeated headers that way)."""
    items = headers.items() if hasattr(headers, "items") else headers
    out: dict[str, list[str]] = {}
    for name, value in items:
        out.setdefault(name.lower(), []).append(value)
    return out


def _first(hdrs: dict[str, list[str]], name: str) -> str | None:
    values = hdrs.get(name)
    return values[0] if values else None


def _raw_pairs(raw_query: str) -> list[tuple[str, str]]:
    pairs = []
    for part in raw_query.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((name, value))
    return pairs


def _form_bytes(component: str) -> bytes:
    return unquote_to_bytes(component.replace("+", " "))


def _form_text(component: str) -> str:
    return _form_bytes(component).decode("utf-8", "replace")


def canonical_uri(raw_path: str) -> str:
    """The canonical URI of a path as sent: percent-escapes decoded, every byte re-encoded but
    ``A-Za-z0-9-._~/``."""
    return quote(unquote_to_bytes(raw_path or "/"), safe="/")


def canonical_query(raw_query: str, *, presigned: bool = False) -> str:
    """The canonical query string of a query as sent (form-decoded, re-encoded, sorted); a
    presigned request's ``X-Amz-Signature`` left out."""
    encoded = []
    for name, value in _raw_pairs(raw_query):
        name_bytes = _form_bytes(name)
        if presigned and name_bytes == _Q_SIGNATURE.encode():
            continue
        encoded.append((quote(name_bytes, safe=""), quote(_form_bytes(value), safe="")))
    return "&".join(f"{n}={v}" for n, v in sorted(encoded))


def _literal_query(raw_query: str, *, presigned: bool) -> str:
    pairs = [(n, v) for n, v in _raw_pairs(raw_query)
             if not (presigned and _form_bytes(n) == _Q_SIGNATURE.encode())]
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def _query_has_sigv4(raw_query: str) -> bool:
    if "X-Amz-" not in raw_query and "%" not in raw_query:
        return False
    return any(_form_text(name) in _QUERY_AUTH_PARAMS for name, _ in _raw_pairs(raw_query))


def request_has_sigv4(raw_query: str,
                      headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> bool:
    """Whether the request claims SigV4: an ``Authorization: AWS4-...`` header or ``X-Amz-``
    signing parameters in the query (not whether they are valid)."""
    auth = _first(_lower_headers(headers), "authorization")
    if auth is not None and auth.lstrip().startswith("AWS4-"):
        return True
    return _query_has_sigv4(raw_query)


def _parse_credential(value: str, code: str) -> tuple[str, str, str]:
    parts = value.split("/")
    if len(parts) != 5:
        raise AuthError(code, "The credential must be ACCESS_KEY_ID/YYYYMMDD/REGION/s3/"
                              "aws4_request")
    access_key_id, date, region, service, terminator = parts
    if not _ACCESS_KEY_ID.fullmatch(access_key_id):
        raise AuthError(code, "The credential's access key id is malformed")
    if not _SCOPE_DATE.fullmatch(date):
        raise AuthError(code, "The credential's date must be YYYYMMDD")
    if not _REGION.fullmatch(region):
        raise AuthError(code, "The credential's region is malformed")
    if service != SERVICE:
        raise AuthError(code, f"The credential's service must be {SERVICE!r}")
    if terminator != TERMINATOR:
        raise AuthError(code, f"The credential must end with {TERMINATOR!r}")
    return access_key_id, date, region


def _parse_signed_headers(value: str, code: str) -> tuple[str, ...]:
    names = value.split(";")
    if not all(_HEADER_NAME.fullmatch(n) for n in names):
        raise AuthError(code, "SignedHeaders must be lower-case header names separated by ';'")
    if "host" not in names:
        raise AuthError(code, "SignedHeaders must include host")
    return tuple(sorted(set(names)))


def _amz_timestamp(amz_date: str) -> float | None:
    if not _AMZ_DATE.fullmatch(amz_date):
        return None
    try:
        return datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _http_date(value: str) -> str | None:
    """A ``Date`` header (ISO 8601 basic or RFC 1123) as ISO 8601 basic, None if neither."""
    value = value.strip()
    if _amz_timestamp(value) is not None:
        return value
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _from_header(auth: str, hdrs: dict[str, list[str]], now: float) -> _Credentials:
    malformed = "AuthorizationHeaderMalformed"
    algorithm, _, rest = auth.strip().partition(" ")
    if algorithm != ALGORITHM:
        shown = f" {algorithm!r}" if _SCHEME.fullmatch(algorithm) else ""
        raise AuthError(malformed, f"Unsupported signing algorithm{shown}: this gateway accepts "
                                   f"{ALGORITHM} only")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in ("Credential", "SignedHeaders", "Signature") or name in fields:
            raise AuthError(malformed, f"The Authorization header must be '{ALGORITHM} "
                                       "Credential=..., SignedHeaders=..., Signature=...'")
        fields[name] = value.strip()
    if len(fields) != 3:
        raise AuthError(malformed, "The Authorization header lacks "
                        + ", ".join(n for n in ("Credential", "SignedHeaders", "Signature")
                                    if n not in fields))
    access_key_id, scope_date, region = _parse_credential(fields["Credential"], malformed)
    signed = _parse_signed_headers(fields["SignedHeaders"], malformed)

    date_header = "x-amz-date" if "x-amz-date" in hdrs else "date"
    raw_date = _first(hdrs, date_header)
    amz_date = None
    if raw_date is not None:
        amz_date = raw_date.strip() if date_header == "x-amz-date" else _http_date(raw_date)
    when = _amz_timestamp(amz_date) if amz_date else None
    if amz_date is None or when is None:
        raise AuthError("AccessDenied",
                        "AWS authentication requires a valid Date or x-amz-date header")
    unsigned = sorted(n for n in hdrs
                      if (n.startswith("x-amz-") or n == date_header) and n not in signed)
    if unsigned:
        raise AuthError("AccessDenied", "There were headers present in the request which were "
                                        "not signed: " + ", ".join(unsigned))
    if scope_date != amz_date[:8]:
        raise AuthError(malformed, f"Invalid credential date: it is not the date of {date_header}")
    if abs(now - when) > MAX_SKEW_S:
        raise AuthError("RequestTimeTooSkewed", "The difference between the request time and "
                                                "the current time is too large")
    payload = _first(hdrs, "x-amz-content-sha256")
    return _Credentials(access_key_id, scope_date, region, signed, fields["Signature"], amz_date,
                        payload.strip() if payload is not None else EMPTY_SHA256, False)


def _from_query(raw_query: str, now: float) -> _Credentials:
    malformed = "AuthorizationQueryParametersError"
    params: dict[str, str] = {}
    for name, value in _raw_pairs(raw_query):
        decoded = _form_text(name)
        if decoded in _QUERY_AUTH_PARAMS:
            if decoded in params:
                raise AuthError(malformed, f"{decoded} is given more than once")
            params[decoded] = _form_text(value)
    missing = [n for n in (_Q_ALGORITHM, _Q_CREDENTIAL, _Q_SIGNATURE, _Q_DATE, _Q_SIGNED_HEADERS,
                           _Q_EXPIRES) if n not in params]
    if missing:
        raise AuthError(malformed, "Query-string authentication version 4 requires the "
                                   "X-Amz-Algorithm, X-Amz-Credential, X-Amz-Signature, "
                                   "X-Amz-Date, X-Amz-SignedHeaders, and X-Amz-Expires "
                                   "parameters; missing: " + ", ".join(missing))
    if params[_Q_ALGORITHM] != ALGORITHM:
        raise AuthError(malformed, f"X-Amz-Algorithm only supports {ALGORITHM}")
    access_key_id, scope_date, region = _parse_credential(params[_Q_CREDENTIAL], malformed)
    signed = _parse_signed_headers(params[_Q_SIGNED_HEADERS], malformed)
    amz_date = params[_Q_DATE]
    when = _amz_timestamp(amz_date)
    if when is None:
        raise AuthError(malformed, "X-Amz-Date must be in the ISO8601 Long Format "
                                   "\"yyyyMMdd'T'HHmmss'Z'\"")
    if scope_date != amz_date[:8]:
        raise AuthError(malformed, "Invalid credential date: it is not the date of X-Amz-Date")
    expires = params[_Q_EXPIRES]
    if not _EXPIRES.fullmatch(expires) or not 1 <= int(expires) <= MAX_EXPIRES_S:
        raise AuthError(malformed, "X-Amz-Expires must be a whole number of seconds from 1 to "
                                   f"{MAX_EXPIRES_S} (a week)")
    if now > when + int(expires):
        raise AuthError("AccessDenied", "Request has expired")
    if when - now > MAX_SKEW_S:
        raise AuthError("AccessDenied", "Request is not valid yet")
    return _Credentials(access_key_id, scope_date, region, signed, params[_Q_SIGNATURE],
                        amz_date, UNSIGNED_PAYLOAD, True)


_KEY_CACHE: dict[tuple[bytes, str, str], bytes] = {}
_KEY_CACHE_MAX = 256
_KEY_CACHE_LOCK = threading.Lock()


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def _signing_key(secret: str, scope_date: str, region: str) -> bytes:
    """kSigning of (secret, date, region), cached: four HMACs saved on most requests."""
    ident = (hashlib.sha256(secret.encode()).digest(), scope_date, region)
    key = _KEY_CACHE.get(ident)
    if key is None:
        key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret}".encode(), scope_date), region), SERVICE),
                    TERMINATOR)
        with _KEY_CACHE_LOCK:
            if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
                _KEY_CACHE.clear()
            _KEY_CACHE[ident] = key
    return key


def _canonical_headers(creds: _Credentials, hdrs: dict[str, list[str]]) -> str:
    lines = []
    for name in creds.signed_headers:
        values = hdrs.get(name)
        if values is None:
            raise AuthError("SignatureDoesNotMatch",
                            f"The signed header {name} is missing from the request")
        lines.append(f"{name}:" + ",".join(" ".join(v.split()) for v in values))
    return "".join(f"{line}\n" for line in lines)


def _verify(method: str, raw_path: str, raw_query: str, hdrs: dict[str, list[str]],
            keys: KeyFile, now: float | None) -> str:
    now = time.time() if now is None else now
    auth = _first(hdrs, "authorization")
    query_auth = _query_has_sigv4(raw_query)
    if auth is not None and query_auth:
        raise AuthError("InvalidArgument", "Only one auth mechanism allowed; only the "
                                           "X-Amz-Algorithm query parameter or the Authorization "
                                           "header should be specified")
    if auth is not None:
        creds = _from_header(auth, hdrs, now)
    elif query_auth:
        creds = _from_query(raw_query, now)
    else:
        raise AuthError("AccessDenied", "The request is not signed")
    secret = keys.secret(creds.access_key_id)
    if secret is None:
        raise AuthError("InvalidAccessKeyId", "The AWS access key id you provided does not exist "
                                              "in our records")
    if not _SIGNATURE.fullmatch(creds.signature):
        raise AuthError("SignatureDoesNotMatch", "The signature must be 64 lower-case hex digits")

    signed = ";".join(creds.signed_headers)
    headers_block = _canonical_headers(creds, hdrs)
    scope = f"{creds.scope_date}/{creds.region}/{SERVICE}/{TERMINATOR}"
    key = _signing_key(secret, creds.scope_date, creds.region)
    forms = [(canonical_uri(raw_path), canonical_query(raw_query, presigned=creds.presigned))]
    literal = (raw_path or "/", _literal_query(raw_query, presigned=creds.presigned))
    if literal != forms[0]:
        forms.append(literal)
    for uri, query in forms:
        request = "\n".join([method.upper(), uri, query, headers_block, signed,
                             creds.payload_hash])
        digest = hashlib.sha256(request.encode("utf-8", "surrogateescape")).hexdigest()
        string_to_sign = f"{ALGORITHM}\n{creds.amz_date}\n{scope}\n{digest}"
        expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected, creds.signature):
            return creds.access_key_id
    uri, query = forms[0]
    log.debug("SigV4 mismatch for access key %s: %s %s ? %s, signed headers %s, canonical "
              "request sha256 %s", creds.access_key_id, method.upper(), uri, query, signed,
              hashlib.sha256("\n".join([method.upper(), uri, query, headers_block, signed,
                                        creds.payload_hash]).encode("utf-8", "surrogateescape")
                             ).hexdigest())
    raise AuthError("SignatureDoesNotMatch", "The request signature we calculated does not match "
                                             "the signature you provided. Check your key and "
                                             "signing method.")


def verify_sigv4(method: str, raw_path: str, raw_query: str,
                 headers: Mapping[str, str] | Iterable[tuple[str, str]], keys: KeyFile,
                 now: float | None = None) -> str:
    """Check an S3 SigV4 request (Authorization header or presigned query) against ``keys``;
    the access key id if it holds, else AuthError. ``raw_path`` and ``raw_query`` (without
    ``?``) are as on the wire, still percent-encoded; header names in any case; ``now`` is
    seconds since the epoch (default: the clock)."""
    return _verify(method, raw_path, raw_query, _lower_headers(headers), keys, now)


# --------------------------------------------------------------------------- the authenticator

class Authenticator:
    """Picks the scheme a request carries and checks it: SigV4 (header or presigned) against
    ``keys``, ``Authorization: Bearer`` against ``token``; a request with no credentials passes
    only if ``anonymous``. A request carrying credentials never falls back to anonymous."""

    def __init__(self, keys: KeyFile | None = None, token: TokenFile | None = None, *,
                 anonymous: bool = False) -> None:
        if keys is None and token is None and not anonymous:
            raise ConfigError("the gateway would refuse every request: give a key file, a token "
                              "file, or allow anonymous access")
        self.keys = keys
        self.token = token
        self.anonymous = anonymous

    def check(self, method: str, raw_path: str, raw_query: str,
              headers: Mapping[str, str] | Iterable[tuple[str, str]],
              now: float | None = None) -> str:
        """The principal of the request: ``"anonymous"``, ``"token"`` or the access key id;
        AuthError if it is refused."""
        hdrs = _lower_headers(headers)
        auth = _first(hdrs, "authorization")
        scheme = auth.strip().partition(" ")[0] if auth is not None else ""
        if auth is not None and not scheme.startswith("AWS4-"):
            if _query_has_sigv4(raw_query):
                raise AuthError("InvalidArgument", "Only one auth mechanism allowed")
            if scheme.lower() != "bearer":
                shown = f" {scheme!r}" if _SCHEME.fullmatch(scheme) else ""
                raise AuthError("InvalidArgument", f"Unsupported Authorization Type{shown}: this "
                                                   f"gateway accepts {ALGORITHM} and Bearer")
            if self.token is None:
                raise AuthError("AccessDenied", "Bearer tokens are not accepted on this gateway")
            self.token.check(auth)
            return TOKEN
        if auth is not None or _query_has_sigv4(raw_query):
            if self.keys is None:
                raise AuthError("AccessDenied", "Signed (SigV4) requests are not accepted on "
                                                "this gateway")
            return _verify(method, raw_path, raw_query, hdrs, self.keys, now)
        if self.anonymous:
            return ANONYMOUS
        raise AuthError("AccessDenied", "Anonymous access is not allowed on this gateway")
