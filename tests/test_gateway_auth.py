"""Tests of cachefs.gateway.auth: real botocore signatures (header and presigned) verified offline,
refusals with their S3 codes, key and token files re-read on change, the authenticator's choice.

botocore signs exactly what it would send: a before-send hook captures the prepared request and
aborts it, so no network is needed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.config
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.errors import ConfigError, PermissionDenied
from cachefs.gateway.auth import (
    Authenticator,
    AuthError,
    KeyFile,
    TokenFile,
    request_has_sigv4,
    verify_sigv4,
)
from tests.servers import AWS_UNSET_ENV

AKID = "AKIDGATEWAYTEST01"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
OTHER_AKID = "AKIDGATEWAYTEST02"
OTHER_SECRET = "another/secret+value"
ENDPOINT = "http://127.0.0.1:7480"
BUCKET = "bkt"
TOKEN = "tok-3f9a0c1e5b7d"

SPECIAL_KEYS = [
    "plain.bin",
    "dir with spaces/file name.txt",
    "ünïcödé/日本語/😀.txt",
    "a+b=c~d/e",
    "deep/er/and/deeper/",
    "/leading-slash//double",
    "100% sure?#&;,!*'()[]@$",
    "a%2Fb%20c",
]
AWKWARD = "a b+c=d~e/ü&x?y#z%"


@dataclass(frozen=True)
class Wire:
    """A request as it came over the wire: method, raw path and query, lower-case headers."""

    method: str
    path: str
    query: str
    headers: dict[str, str]

    def verify(self, keys: KeyFile, now: float | None = None) -> str:
        return verify_sigv4(self.method, self.path, self.query, self.headers, keys, now)

    def with_header(self, name: str, value: str) -> Wire:
        return replace(self, headers={**self.headers, name: value})


def wire(method: str, url: str, headers: Any = ()) -> Wire:
    parts = urlsplit(url)
    lowered = {"host": parts.netloc}
    for name, value in dict(headers).items():
        lowered[name.lower()] = value.decode() if isinstance(value, bytes) else value
    return Wire(method, parts.path, parts.query, lowered)


class _Sent(Exception):
    """Raised by the before-send hook: the request botocore was about to send."""

    def __init__(self, request: Any) -> None:
        super().__init__("captured")
        self.request = request


def _capture(request: Any, **_: Any) -> None:
    raise _Sent(request)


def make_client(akid: str = AKID, secret: str = SECRET, region: str = "us-east-1") -> Any:
    client = boto3.client(
        "s3", endpoint_url=ENDPOINT, region_name=region, aws_access_key_id=akid,
        aws_secret_access_key=secret,
        config=botocore.config.Config(
            s3={"addressing_style": "path"}, signature_version="s3v4",
            retries={"mode": "standard", "total_max_attempts": 1}))
    client.meta.events.register("before-send.s3", _capture)
    return client


def sent(client: Any, operation: str, **params: Any) -> Wire:
    """The request ``client.<operation>(**params)`` would send."""
    try:
        getattr(client, operation)(**params)
    except _Sent as e:
        return wire(e.request.method, e.request.url, e.request.headers)
    raise AssertionError("botocore sent nothing")


def presigned(client: Any, key: str, expires: int = 300) -> Wire:
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key},
                                        ExpiresIn=expires)
    return wire("GET", url)


def refused(code: str, check: Callable[[], object], status: int | None = None) -> AuthError:
    with pytest.raises(AuthError) as info:
        check()
    err = info.value
    assert err.code == code, (err.code, err.message)
    if status is not None:
        assert err.status == status
    assert SECRET not in str(err) and OTHER_SECRET not in str(err)
    return err


HEX = "0123456789abcdef"


def flip(signature: str, index: int, step: int = 1) -> str:
    """``signature`` with its hex digit at ``index`` moved ``step`` (1-15) places: always another
    digit."""
    char = HEX[(HEX.index(signature[index]) + step) % 16]
    return signature[:index] + char + signature[index + 1:]


def header_signature(w: Wire) -> str:
    return w.headers["authorization"].rpartition("Signature=")[2]


def write_keys(path: Path, keys: dict[str, str], *, mtime_s: int | None = None) -> None:
    path.write_text(json.dumps({"keys": keys}))
    if mtime_s is not None:
        os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No real AWS configuration reaches the module's clients (built before isolated_home)."""
    nowhere = tmp_path_factory.mktemp("aws") / "absent"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_CONFIG_FILE", str(nowhere))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        for name in AWS_UNSET_ENV:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def client(aws_env: None) -> Any:
    return make_client()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFile:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(f'"{AKID}" = "{SECRET}"\n"{OTHER_AKID}" = "{OTHER_SECRET}"\n')
    return KeyFile(path)


# --------------------------------------------------------------------------- real signatures

@pytest.mark.parametrize("key", SPECIAL_KEYS)
def test_get_and_head_with_awkward_keys_verify(client: Any, keys: KeyFile, key: str) -> None:
    for operation in ("get_object", "head_object"):
        request = sent(client, operation, Bucket=BUCKET, Key=key)
        assert request.verify(keys) == AKID


def test_list_objects_v2_with_awkward_parameters_verifies(client: Any, keys: KeyFile) -> None:
    request = sent(client, "list_objects_v2", Bucket=BUCKET, Prefix=AWKWARD, Delimiter="/",
                   ContinuationToken="tok+/=en==", StartAfter="x&y=z ü~", MaxKeys=7)
    assert "prefix=" in request.query and "continuation-token=" in request.query
    assert request.verify(keys) == AKID
    assert sent(client, "list_objects_v2", Bucket=BUCKET).verify(keys) == AKID
    assert sent(client, "list_buckets").verify(keys) == AKID


@pytest.mark.parametrize("key", SPECIAL_KEYS)
def test_presigned_get_verifies(client: Any, keys: KeyFile, key: str) -> None:
    request = presigned(client, key)
    assert "X-Amz-Signature=" in request.query
    assert request.verify(keys) == AKID


def test_any_region_is_accepted(aws_env: None, keys: KeyFile) -> None:
    for region in ("eu-central-1", "auto", "garage"):
        regional = make_client(region=region)
        assert sent(regional, "get_object", Bucket=BUCKET, Key="k").verify(keys) == AKID
        assert presigned(regional, "k").verify(keys) == AKID


def test_plus_in_query_reads_as_space(client: Any, keys: KeyFile) -> None:
    """The query is form-decoded: raw '+' is a space, so it stands for %20, never for %2B."""
    spaced = sent(client, "list_objects_v2", Bucket=BUCKET, Prefix="a b")
    assert "prefix=a%20b" in spaced.query
    assert replace(spaced, query=spaced.query.replace("a%20b", "a+b")).verify(keys) == AKID
    plus = sent(client, "list_objects_v2", Bucket=BUCKET, Prefix="a+b")
    assert "prefix=a%2Bb" in plus.query
    refused("SignatureDoesNotMatch",
            lambda: replace(plus, query=plus.query.replace("a%2Bb", "a+b")).verify(keys))


def test_a_path_signed_literally_as_sent_verifies(keys: KeyFile) -> None:
    """A client that encodes differently (lower-case hex, raw '!') but signs what it sends."""
    url = f"{ENDPOINT}/{BUCKET}/odd!name%2fwith%7esub"
    request = AWSRequest(method="GET", url=url,
                         headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    S3SigV4Auth(Credentials(AKID, SECRET), "s3", "us-east-1").add_auth(request)
    assert wire("GET", url, request.headers).verify(keys) == AKID


# --------------------------------------------------------------------------- refusals

def test_tampered_signature_is_refused(client: Any, keys: KeyFile) -> None:
    request = sent(client, "get_object", Bucket=BUCKET, Key="k")
    signature = header_signature(request)
    bad = flip(signature, 63)
    tampered = request.with_header("authorization",
                                   request.headers["authorization"].replace(signature, bad))
    err = refused("SignatureDoesNotMatch", lambda: tampered.verify(keys), 403)
    assert signature not in str(err) and bad not in str(err)
    upper = request.with_header("authorization",
                                request.headers["authorization"].replace(signature,
                                                                         signature.upper()))
    refused("SignatureDoesNotMatch", lambda: upper.verify(keys))

    url = presigned(client, "k")
    query_sig = url.query.rpartition("X-Amz-Signature=")[2]
    bad_query = replace(url, query=url.query.replace(query_sig, query_sig[::-1]))
    refused("SignatureDoesNotMatch", lambda: bad_query.verify(keys))


def test_unknown_access_key_is_refused(aws_env: None, keys: KeyFile) -> None:
    stranger = make_client(akid="AKIDNOBODYKNOWS", secret=SECRET)
    request = sent(stranger, "get_object", Bucket=BUCKET, Key="k")
    refused("InvalidAccessKeyId", lambda: request.verify(keys), 403)
    refused("InvalidAccessKeyId", lambda: presigned(stranger, "k").verify(keys), 403)


def test_wrong_secret_is_refused(aws_env: None, keys: KeyFile) -> None:
    impostor = make_client(akid=AKID, secret=OTHER_SECRET)
    refused("SignatureDoesNotMatch",
            lambda: sent(impostor, "get_object", Bucket=BUCKET, Key="k").verify(keys))
    other = make_client(akid=OTHER_AKID, secret=OTHER_SECRET)
    assert sent(other, "get_object", Bucket=BUCKET, Key="k").verify(keys) == OTHER_AKID


def test_changes_after_signing_are_refused(client: Any, keys: KeyFile) -> None:
    get = sent(client, "get_object", Bucket=BUCKET, Key="secret/report.pdf")
    refused("SignatureDoesNotMatch",
            lambda: replace(get, path=get.path.replace("report", "payroll")).verify(keys))
    refused("SignatureDoesNotMatch", lambda: replace(get, method="HEAD").verify(keys))
    refused("SignatureDoesNotMatch", lambda: replace(get, query="versionId=1").verify(keys))
    refused("SignatureDoesNotMatch",
            lambda: get.with_header("x-amz-checksum-mode", "DISABLED").verify(keys))
    refused("SignatureDoesNotMatch", lambda: get.with_header("host", "evil:1").verify(keys))

    listing = sent(client, "list_objects_v2", Bucket=BUCKET, Prefix="public/")
    refused("SignatureDoesNotMatch",
            lambda: replace(listing, query=listing.query.replace("public", "private"))
            .verify(keys))
    refused("SignatureDoesNotMatch",
            lambda: replace(listing, query=listing.query + "&start-after=z").verify(keys))

    url = presigned(client, "public/a")
    refused("SignatureDoesNotMatch",
            lambda: replace(url, path=url.path.replace("public", "private")).verify(keys))
    refused("SignatureDoesNotMatch",
            lambda: replace(url, query=url.query.replace("X-Amz-Expires=300",
                                                         "X-Amz-Expires=600")).verify(keys))


def test_missing_signed_header_and_unsigned_amz_header_are_refused(client: Any,
                                                                  keys: KeyFile) -> None:
    get = sent(client, "get_object", Bucket=BUCKET, Key="k")
    without = replace(get, headers={k: v for k, v in get.headers.items()
                                    if k != "x-amz-checksum-mode"})
    refused("SignatureDoesNotMatch", lambda: without.verify(keys))
    err = refused("AccessDenied",
                  lambda: get.with_header("x-amz-request-payer", "requester").verify(keys))
    assert "x-amz-request-payer" in err.message


def test_expired_presigned_url_is_refused(client: Any, keys: KeyFile) -> None:
    url = presigned(client, "k", expires=60)
    assert url.verify(keys, now=time.time() + 30) == AKID
    err = refused("AccessDenied", lambda: url.verify(keys, now=time.time() + 3600), 403)
    assert err.message == "Request has expired"
    err = refused("AccessDenied", lambda: url.verify(keys, now=time.time() - 3600))
    assert "not valid yet" in err.message


@pytest.mark.parametrize("skew", [20 * 60, -20 * 60])
def test_clock_skew_is_refused(client: Any, keys: KeyFile, skew: int) -> None:
    get = sent(client, "get_object", Bucket=BUCKET, Key="k")
    assert get.verify(keys, now=time.time() + 10 * 60 * (1 if skew > 0 else -1)) == AKID
    refused("RequestTimeTooSkewed", lambda: get.verify(keys, now=time.time() + skew), 403)


def test_malformed_authorization_header_is_refused(client: Any, keys: KeyFile) -> None:
    get = sent(client, "get_object", Bucket=BUCKET, Key="k")
    auth = get.headers["authorization"]
    credential = f"{AKID}/{get.headers['x-amz-date'][:8]}/us-east-1/s3/aws4_request"
    signature = header_signature(get)
    variants = [
        "AWS4-HMAC-SHA256",
        "AWS4-HMAC-SHA256 garbage",
        auth.replace(", Signature=", ", Sig="),
        auth.rpartition(",")[0],
        auth + ", Signature=" + signature,
        auth.replace(credential, credential.replace("/s3/", "/ec2/")),
        auth.replace(credential, credential.replace("/aws4_request", "/aws4")),
        auth.replace(credential, credential.replace("/us-east-1", "")),
        auth.replace(credential, credential.replace(credential[len(AKID) + 1:][:8], "20000101")),
        auth.replace("SignedHeaders=host;", "SignedHeaders="),
        auth.replace("SignedHeaders=host", "SignedHeaders=Host"),
        auth.replace("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256"),
    ]
    for variant in variants:
        err = refused("AuthorizationHeaderMalformed",
                      lambda v=variant: get.with_header("authorization", v).verify(keys), 400)
        assert signature not in str(err)


def test_missing_date_is_refused(client: Any, keys: KeyFile) -> None:
    get = sent(client, "get_object", Bucket=BUCKET, Key="k")
    no_date = replace(get, headers={k: v for k, v in get.headers.items() if k != "x-amz-date"})
    refused("AccessDenied", lambda: no_date.verify(keys))
    refused("AccessDenied", lambda: get.with_header("x-amz-date", "yesterday").verify(keys))


def test_malformed_presigned_query_is_refused(client: Any, keys: KeyFile) -> None:
    url = presigned(client, "k", expires=60)
    for old, new in [("X-Amz-Expires=60", "X-Amz-Expires=0"),
                     ("X-Amz-Expires=60", "X-Amz-Expires=604801"),
                     ("X-Amz-Expires=60", "X-Amz-Expires=soon"),
                     ("X-Amz-Expires=60&", ""),
                     ("X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Algorithm=AWS4-HMAC-SHA1"),
                     ("%2Fs3%2F", "%2Fsqs%2F"),
                     ("X-Amz-SignedHeaders=host", "X-Amz-SignedHeaders=x-amz-date"),
                     ("X-Amz-Date=", "X-Amz-Date=1")]:
        assert old in url.query
        changed = replace(url, query=url.query.replace(old, new))
        refused("AuthorizationQueryParametersError", lambda c=changed: c.verify(keys), 400)
    doubled = replace(url, query=url.query + "&X-Amz-Expires=60")
    refused("AuthorizationQueryParametersError", lambda: doubled.verify(keys), 400)


def test_both_signature_forms_at_once_are_refused(client: Any, keys: KeyFile) -> None:
    url = presigned(client, "k")
    get = sent(client, "get_object", Bucket=BUCKET, Key="k")
    both = url.with_header("authorization", get.headers["authorization"])
    refused("InvalidArgument", lambda: both.verify(keys), 400)
    refused("AccessDenied", lambda: wire("GET", f"{ENDPOINT}/{BUCKET}/k").verify(keys))


def test_request_has_sigv4(client: Any) -> None:
    get = sent(client, "get_object", Bucket=BUCKET, Key="k")
    assert request_has_sigv4(get.query, get.headers)
    assert request_has_sigv4(get.query, {"Authorization": get.headers["authorization"]})
    url = presigned(client, "k")
    assert request_has_sigv4(url.query, url.headers)
    assert not request_has_sigv4("prefix=a&list-type=2", {"host": "h"})
    assert not request_has_sigv4("", {"authorization": f"Bearer {TOKEN}"})


# --------------------------------------------------------------------------- property

@settings(max_examples=40, deadline=None)
@given(key=st.text(st.characters(blacklist_characters="\x00"), min_size=1, max_size=200),
       data=st.data())
def test_botocore_signed_keys_verify_and_any_flipped_char_fails(
        client: Any, keys: KeyFile, key: str, data: st.DataObject) -> None:
    get = sent(client, "get_object", Bucket=BUCKET, Key=key)
    assert get.verify(keys) == AKID
    url = presigned(client, key)
    assert url.verify(keys) == AKID

    signature = header_signature(get)
    index = data.draw(st.integers(0, len(signature) - 1))
    step = data.draw(st.integers(1, 15))
    tampered = get.with_header(
        "authorization", get.headers["authorization"].replace(signature,
                                                              flip(signature, index, step)))
    refused("SignatureDoesNotMatch", lambda: tampered.verify(keys))
    query_sig = url.query.rpartition("X-Amz-Signature=")[2]
    bad_url = replace(url, query=url.query.replace(query_sig, flip(query_sig, index, step)))
    refused("SignatureDoesNotMatch", lambda: bad_url.verify(keys))


# --------------------------------------------------------------------------- key file

def test_key_file_formats(tmp_path: Path) -> None:
    flat_toml = tmp_path / "flat.toml"
    flat_toml.write_text(f'{AKID} = "{SECRET}"\n')
    nested_toml = tmp_path / "nested.toml"
    nested_toml.write_text(f'# comment\n[keys]\n{AKID} = "{SECRET}"\n')
    flat_json = tmp_path / "keys.json"
    flat_json.write_text(json.dumps({AKID: SECRET}))
    nested_any = tmp_path / "keys"
    nested_any.write_text(json.dumps({"keys": {AKID: SECRET}}))
    for path in (flat_toml, nested_toml, flat_json, nested_any):
        loaded = KeyFile(path)
        assert loaded.secret(AKID) == SECRET
        assert loaded.secret(OTHER_AKID) is None


@pytest.mark.parametrize("content", [
    "not json",
    json.dumps([AKID, SECRET]),
    json.dumps({AKID: ""}),
    json.dumps({AKID: 42}),
    json.dumps({"": SECRET}),
    json.dumps({"has/slash": SECRET}),
    json.dumps({"has space": SECRET}),
    json.dumps({"anonymous": SECRET}),
    json.dumps({"keys": {AKID: SECRET}, "other": "x"}),
])
def test_key_file_refused_at_construction(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        KeyFile(path)
    assert SECRET not in str(info.value) and str(path) in str(info.value)


def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        KeyFile(tmp_path / "absent.toml")
    with pytest.raises(ConfigError):
        TokenFile(tmp_path / "absent")


def test_key_file_reloads_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_keys(path, {AKID: SECRET}, mtime_s=1_000_000)
    loaded = KeyFile(path, check_interval=0)
    assert loaded.secret(AKID) == SECRET
    write_keys(path, {OTHER_AKID: OTHER_SECRET}, mtime_s=1_000_001)
    assert loaded.secret(AKID) is None
    assert loaded.secret(OTHER_AKID) == OTHER_SECRET
    write_keys(path, {}, mtime_s=1_000_002)
    assert loaded.secret(OTHER_AKID) is None


def test_key_file_checks_at_most_every_interval(tmp_path: Path) -> None:
    clock = [100.0]
    path = tmp_path / "keys.json"
    write_keys(path, {AKID: SECRET}, mtime_s=1_000_000)
    loaded = KeyFile(path, check_interval=1.0, clock=lambda: clock[0])
    write_keys(path, {AKID: OTHER_SECRET}, mtime_s=1_000_001)
    clock[0] += 0.5
    assert loaded.secret(AKID) == SECRET
    clock[0] += 0.6
    assert loaded.secret(AKID) == OTHER_SECRET


def test_a_key_file_that_breaks_keeps_the_old_keys(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'{AKID} = "{SECRET}"\n')
    os.utime(path, ns=(10**18, 10**18))
    loaded = KeyFile(path, check_interval=0)
    caplog.set_level(logging.WARNING, logger="cachefs.gateway.auth")
    path.write_text(f'{AKID} = "{OTHER_SECRET}\n')  # unterminated string
    os.utime(path, ns=(10**18 + 1, 10**18 + 1))
    assert loaded.secret(AKID) == SECRET
    assert loaded.secret(AKID) == SECRET
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per change, not once per look
    assert "keeping the previous" in warnings[0].getMessage()
    assert SECRET not in caplog.text and OTHER_SECRET not in caplog.text

    path.unlink()
    assert loaded.secret(AKID) == SECRET
    path.write_text(f'{AKID} = "{OTHER_SECRET}"\n')
    os.utime(path, ns=(10**18 + 2, 10**18 + 2))
    assert loaded.secret(AKID) == OTHER_SECRET


def test_a_reloaded_key_file_changes_what_verifies(aws_env: None, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_keys(path, {AKID: SECRET}, mtime_s=1_000_000)
    loaded = KeyFile(path, check_interval=0)
    request = sent(make_client(), "get_object", Bucket=BUCKET, Key="k")
    assert request.verify(loaded) == AKID
    write_keys(path, {AKID: OTHER_SECRET}, mtime_s=1_000_001)
    refused("SignatureDoesNotMatch", lambda: request.verify(loaded))
    write_keys(path, {}, mtime_s=1_000_002)
    refused("InvalidAccessKeyId", lambda: request.verify(loaded))


# --------------------------------------------------------------------------- token file

def test_token_file_right_wrong_missing(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    token = TokenFile(path, check_interval=0)
    assert token.token() == TOKEN
    token.check(f"Bearer {TOKEN}")
    for header in (None, "", TOKEN, f"Bearer {TOKEN}x", f"Bearer  {TOKEN}", f"bearer {TOKEN}",
                   f"Basic {TOKEN}", "Bearer ünï"):
        err = refused("AccessDenied", lambda h=header: token.check(h), 403)
        assert TOKEN not in str(err)
        assert isinstance(err, PermissionDenied)


def test_token_file_reloads_and_refuses_empty(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        TokenFile(path)
    path.write_text(TOKEN)
    os.utime(path, ns=(10**18, 10**18))
    token = TokenFile(path, check_interval=0)
    path.write_text("new-token")
    os.utime(path, ns=(10**18 + 1, 10**18 + 1))
    refused("AccessDenied", lambda: token.check(f"Bearer {TOKEN}"))
    token.check("Bearer new-token")
    path.write_text("\n")
    os.utime(path, ns=(10**18 + 2, 10**18 + 2))
    token.check("Bearer new-token")


# --------------------------------------------------------------------------- authenticator

@pytest.fixture
def token_file(tmp_path: Path) -> TokenFile:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    return TokenFile(path)


def test_authenticator_anonymous_on_and_off(keys: KeyFile, token_file: TokenFile) -> None:
    plain = wire("GET", f"{ENDPOINT}/{BUCKET}/k?list-type=2")
    assert Authenticator(anonymous=True).check(plain.method, plain.path, plain.query,
                                               plain.headers) == "anonymous"
    closed = Authenticator(keys, token_file)
    err = refused("AccessDenied",
                  lambda: closed.check(plain.method, plain.path, plain.query, plain.headers), 403)
    assert "Anonymous" in err.message
    with pytest.raises(ConfigError):
        Authenticator()


def test_authenticator_routes_each_scheme(client: Any, keys: KeyFile,
                                          token_file: TokenFile) -> None:
    gate = Authenticator(keys, token_file, anonymous=True)

    def check(w: Wire) -> str:
        return gate.check(w.method, w.path, w.query, w.headers)

    get = sent(client, "get_object", Bucket=BUCKET, Key="k")
    url = presigned(client, "k")
    bearer = wire("GET", f"{ENDPOINT}/{BUCKET}/k", {"Authorization": f"Bearer {TOKEN}"})
    assert check(get) == AKID
    assert check(url) == AKID
    assert check(bearer) == "token"
    # Credentials that fail never fall back to anonymous access.
    refused("AccessDenied", lambda: check(bearer.with_header("authorization", "Bearer nope")))
    refused("SignatureDoesNotMatch", lambda: check(replace(get, path="/bkt/other")))
    refused("InvalidArgument",
            lambda: check(bearer.with_header("authorization", "AWS AKID:c2lnbmF0dXJl")), 400)
    refused("InvalidArgument",
            lambda: check(replace(bearer, query=url.query)), 400)

    sig_only = Authenticator(keys)
    refused("AccessDenied", lambda: sig_only.check(bearer.method, bearer.path, bearer.query,
                                                   bearer.headers))
    token_only = Authenticator(token=token_file)
    assert token_only.check(bearer.method, bearer.path, bearer.query, bearer.headers) == "token"
    refused("AccessDenied", lambda: token_only.check(get.method, get.path, get.query,
                                                     get.headers))
    refused("AccessDenied", lambda: token_only.check(url.method, url.path, url.query,
                                                     url.headers))
