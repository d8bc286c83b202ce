"""Bad input is refused when it is given: remote URLs at `remote add`, ref names at creation.

A remote URL is checked as opening it would check it (scheme, bucket or host, every option and
its value) but without connecting; a branch, tag or dataset name follows git's
check-ref-format rules. Both fail with exit 2 and one line naming what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cachefs.errors import ConfigError, InvalidName
from cachefs.names import check_name, parse_address
from cachefs.remotes.registry import check_remote_url
from tests.helpers import cli_json, run_cli

# -- remote URLs ------------------------------------------------------------------------------

GOOD_URLS = [
    "file:///srv/cachefs-repo",
    "file://localhost/srv/repo",
    "s3://bucket",
    "s3://bucket/some/prefix?endpoint_url=http://127.0.0.1:9000&region=us-east-1"
    "&addressing_style=path&request_checksum_calculation=when_required&max_connections=64",
    "oss://bucket-1/p?endpoint=https://oss-cn-hangzhou.aliyuncs.com",
    "oss://bucket-1/p?endpoint=http://127.0.0.1:8080&region=cn-test&max_connections=8",
    "haystack://10.0.0.1:7700,10.0.0.2:7700/team?token_file=/etc/cachefs/token&timeout=5",
]

BAD_URLS = [  # (url, what the message must say)
    ("ftp://h/p", "scheme 'ftp://'"),
    ("gopher://x", "supported: file://, haystack://, oss://, s3://"),
    ("/just/a/path", "no scheme"),
    ("s3://b/p?bogus=1", "unknown S3 remote option(s) bogus; known: addressing_style"),
    ("s3://b/p?bogus", "unknown S3 remote option(s) bogus"),  # a blank option counts
    ("s3://b/p?endpoint=http://h", "known: addressing_style, endpoint_url, max_connections"),
    ("s3:///no-bucket", "no bucket"),
    ("s3://b?addressing_style=sideways", "expected one of auto, path, virtual"),
    ("s3://b?request_checksum_calculation=never", "when_required, when_supported"),
    ("s3://b?endpoint_url=127.0.0.1:9000", "endpoint_url: expected http(s)://HOST[:PORT]"),
    ("s3://b?max_connections=lots", "max_connections='lots'"),
    ("s3://b?max_connections=1", "at least 2"),
    ("oss://b/p", "needs endpoint="),
    ("oss://b/p?endpoint=http://h&bucket=x", "unknown OSS remote option(s) bucket"),
    ("oss://B_ad/p?endpoint=https://oss-cn-hangzhou.aliyuncs.com", "invalid OSS bucket name"),
    ("oss://b1x/p?endpoint=http://127.0.0.1:1", "does not name its region"),
    ("haystack://h:7700?token=abc", "unknown haystack remote option(s) token; known: timeout"),
    ("haystack://h", "expected HOST:PORT"),
    ("haystack://h:1?timeout=-3", "positive number"),
    ("haystack://h:1/bad..ns/x!", "haystack namespace"),
    ("file://otherhost/p", "expected file:///absolute/path"),
    ("file:///p?sync=1", "a file URL takes no options"),
]


@pytest.mark.parametrize("url", GOOD_URLS)
def test_valid_remote_urls_pass_without_connecting(url: str) -> None:
    check_remote_url(url)  # nothing listens on those addresses: parsing alone must pass


@pytest.mark.parametrize(("url", "message"), BAD_URLS)
def test_invalid_remote_urls_are_refused_naming_the_problem(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_remote_url(url)
    assert message in str(caught.value)


@pytest.mark.parametrize("url", [
    "s3://AKIA:s3cr3t@bucket/p", "oss://id:s3cr3t@bucket/p?endpoint=http://h",
    "haystack://u:s3cr3t@h:1", "file://u:s3cr3t@localhost/p", "ftp://u:s3cr3t@h/p",
    "s3://bucket/p?bogus=s3cr3t",
])
def test_credentials_in_a_url_are_never_echoed(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_remote_url(url)
    assert "s3cr3t" not in str(caught.value)


def test_remote_add_refuses_bad_urls_and_keeps_good_ones() -> None:
    for url, message in [("ftp://h/p", "scheme 'ftp://'"),
                         ("s3://b/p?bogus=1", "unknown S3 remote option(s) bogus")]:
        proc = run_cli("remote", "add", "x", url, check=False)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert [r["name"] for r in cli_json("remote", "list")] == ["local"]  # nothing was saved
    for i, url in enumerate(GOOD_URLS):
        run_cli("remote", "add", f"r{i}", url)
    assert {r["name"]: r["url"] for r in cli_json("remote", "list")} == {
        "local": cli_json("remote", "list")[0]["url"],
        **{f"r{i}": url for i, url in enumerate(GOOD_URLS)}}


# -- ref names --------------------------------------------------------------------------------

BAD_NAMES = [  # (name, the rule named)
    ("bad..x", "contains '..'"),
    ("x.lock", "ends with '.lock'"),
    ("v1.", "ends with '.'"),
    ("a b", "contains ' '"),
    ("a~1", "contains '~'"),
    ("a^", "contains '^'"),
    ("a:b", "contains ':'"),
    ("a?", "contains '?'"),
    ("a*", "contains '*'"),
    ("a[1]", "contains '['"),
    ("a\\b", "contains '\\\\'"),
    ("a\tb", "control character"),
    ("a\x7fb", "control character"),
    ("a@{1}", "contains '@{'"),
    ("@", "exactly '@'"),
    (".hidden", "starts with '.'"),
    ("", "empty"),
    ("a/b", "[A-Za-z0-9._-]"),  # one component: no '/' (a key segment)
    ("-x", "starting with a letter or digit"),
    ("x" * 129, "1-128 characters"),
]
GOOD_NAMES = ["main", "v1.0", "release-2024.06", "exp_1", "a.b-c_d", "x" * 128, "a.lockx",
              "lock", "1.2.3"]


@pytest.mark.parametrize(("name", "rule"), BAD_NAMES)
def test_bad_ref_names_are_refused_naming_the_rule(name: str, rule: str) -> None:
    with pytest.raises(InvalidName) as caught:
        check_name(name, "branch name")
    assert rule in str(caught.value) and "invalid branch name" in str(caught.value)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_stay_valid(name: str) -> None:
    assert check_name(name, "tag name") == name
    assert parse_address(f"ds@{name}:a/b").ref == name


def test_an_address_names_the_broken_rule() -> None:
    with pytest.raises(InvalidName,
                       match=r"invalid ref 'bad/x': use 1-128 characters.* in 'ds@bad/x'"):
        parse_address("ds@bad/x")
    # An address names what exists, perhaps from before the git rules: only characters count.
    assert parse_address("ds@bad..x").ref == "bad..x"
    assert parse_address("ds@abcd1234").ref == "abcd1234"  # a commit prefix


def test_refs_named_before_the_git_rules_stay_usable(tmp_path: Path) -> None:
    """A branch created by an older cachefs as `a..b` can still be read, moved and deleted;
    only creating such a name is refused."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    run_cli("init", "ds")
    run_cli("commit", "ds", str(src), "-m", "v1")
    run_cli("branch", "ds", "ab")
    heads = tmp_path / "home" / "data" / "cachefs" / "repo" / "refs" / "ds" / "heads"
    (heads / "ab").rename(heads / "a..b")  # what an older cachefs would have written
    assert {b["name"] for b in cli_json("branch", "ds")} == {"main", "a..b"}
    assert len(cli_json("log", "ds@a..b")) == 1
    (src / "g").write_text("y")
    run_cli("commit", "ds@a..b", str(src), "-m", "v2")  # moving it is fine
    assert len(cli_json("log", "ds@a..b")) == 2
    run_cli("branch", "ds", "-d", "a..b")
    assert {b["name"] for b in cli_json("branch", "ds")} == {"main"}
    proc = run_cli("branch", "ds", "a..b", check=False)  # but never created again
    assert proc.returncode == 2 and "contains '..'" in proc.stderr, proc.stderr


def test_branch_and_tag_with_bad_names_fail_with_exit_2(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    run_cli("init", "ds")
    run_cli("commit", "ds", str(src), "-m", "v1")
    for argv, rule in [(["branch", "ds", "bad..x"], "contains '..'"),
                       (["tag", "ds", "v1.lock"], "ends with '.lock'"),
                       (["tag", "ds", "v1."], "ends with '.'"),
                       (["init", "ds..2"], "contains '..'")]:
        proc = run_cli(*argv, check=False)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert rule in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    run_cli("branch", "ds", "exp-1.2_x")
    run_cli("tag", "ds", "v1.0.0", "exp-1.2_x")
    assert {b["name"] for b in cli_json("branch", "ds")} == {"main", "exp-1.2_x"}
    assert [t["name"] for t in cli_json("tag", "ds")] == ["v1.0.0"]
