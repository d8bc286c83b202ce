"""A ref update whose reply was lost is still the update that won (no false conflict).

SDKs retry a request whose reply never came; for a put-if-absent the retry finds the object
already there, its own. The ref layer reads the generation back and, when it holds exactly the
bytes this attempt wrote, reports success. Checked with a wrapper remote that loses the first
reply, and for real: a proxy in front of the moto S3 server that cuts the connection after
forwarding the first ref PUT (boto3 retries and gets 412), and one in front of the OSS test
server that answers that PUT 504 (the OSS remote retries 5xx and gets 409 FileAlreadyExists).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from cachefs.dataset.commit import commit_directory
from cachefs.dataset.refs import GenerationRefStore, RefValue
from cachefs.dataset.repo import Repository
from cachefs.errors import RefConflict
from cachefs.remotes.local import LocalRemote
from cachefs.remotes.registry import open_remote_url
from tests.fault_proxy import LOST, Fault, FaultProxy
from tests.faulty_remote import LostReplyRemote
from tests.helpers import run_cli

# The ref object the second commit creates: the fault hits a compare-and-swap, not a creation.
SECOND_GENERATION = "/refs/ds/heads/main/00000000000000000002"


def write_source(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "file").write_text(text)
    return root


def test_a_commit_whose_ref_reply_was_lost_succeeds(tmp_path: Path) -> None:
    plain = Repository(LocalRemote(tmp_path / "repo"))
    plain.create_dataset("ds")
    first = commit_directory(plain, "ds", "main", write_source(tmp_path / "one", "one"), "one")

    lossy = LostReplyRemote(LocalRemote(tmp_path / "repo"), prefix="refs/")
    result = commit_directory(Repository(lossy), "ds", "main",
                              write_source(tmp_path / "two", "two"), "two")
    assert lossy.lost == 1  # the reply of the ref create really was lost
    head = Repository(LocalRemote(tmp_path / "repo")).refs.read("ds", "heads", "main")
    assert head == RefValue(result.commit, 2) and result.parent == first.commit


def test_a_lost_reply_of_another_writers_update_is_still_a_conflict(tmp_path: Path) -> None:
    """The read-back tells our own generation from a rival's: a rival's win stays a conflict."""
    remote = LocalRemote(tmp_path / "repo")
    refs = GenerationRefStore(remote)
    c1, c2 = "1" * 64, "2" * 64
    refs.compare_and_swap("ds", "heads", "main", RefValue(None, 0), c1, "rival")
    with pytest.raises(RefConflict, match="moved concurrently"):
        refs.compare_and_swap("ds", "heads", "main", RefValue(None, 0), c2, "loser")
    assert refs.read("ds", "heads", "main") == RefValue(c1, 1)


def endpoint_of(url: str, option: str) -> str:
    return parse_qs(urlparse(url).query)[option][0]


def commit_through(url: str, tmp_path: Path) -> tuple[str, str]:
    """Commit twice through the CLI (the first creates the branch); the commits' hashes."""
    run_cli("init", "ds", "--remote", url)
    hashes = []
    for text in ("one", "two"):
        run_cli("commit", "ds", str(write_source(tmp_path / text, text)), "-m", text,
                "--remote", url)
        hashes.append(Repository(open_remote_url(url)).refs.read("ds", "heads", "main").commit)
    return hashes[0] or "", hashes[1] or ""


def test_s3_commit_survives_a_cut_connection_on_the_ref_put(s3_url: str,
                                                             tmp_path: Path) -> None:
    endpoint = endpoint_of(s3_url, "endpoint_url")
    with FaultProxy(endpoint, Fault("PUT", SECOND_GENERATION, LOST)) as proxy:
        proxied = s3_url.replace(endpoint, proxy.endpoint)
        first, second = commit_through(proxied, tmp_path)
        assert proxy.faults[0].hits == 1  # boto3 retried the cut PUT and was told 412
    refs = Repository(open_remote_url(s3_url)).refs
    assert [e.commit for e in refs.history("ds", "heads", "main")] == [second, first]


def test_oss_commit_survives_a_gateway_timeout_on_the_ref_put(oss_url: str,
                                                              tmp_path: Path) -> None:
    endpoint = endpoint_of(oss_url, "endpoint")
    with FaultProxy(endpoint, Fault("PUT", SECOND_GENERATION, 504)) as proxy:
        proxied = oss_url.replace(endpoint, proxy.endpoint)
        first, second = commit_through(proxied, tmp_path)
        assert proxy.faults[0].hits == 1  # the remote retried the 504 and was told 409
    refs = Repository(open_remote_url(oss_url)).refs
    assert [e.commit for e in refs.history("ds", "heads", "main")] == [second, first]


def test_oss_commit_survives_a_cut_connection_on_the_ref_put(oss_url: str,
                                                             tmp_path: Path) -> None:
    """oss2 does not resend after a cut connection: the error itself sends us to read back."""
    endpoint = endpoint_of(oss_url, "endpoint")
    with FaultProxy(endpoint, Fault("PUT", SECOND_GENERATION, LOST)) as proxy:
        proxied = oss_url.replace(endpoint, proxy.endpoint)
        first, second = commit_through(proxied, tmp_path)
        assert proxy.faults[0].hits == 1
    refs = Repository(open_remote_url(oss_url)).refs
    assert [e.commit for e in refs.history("ds", "heads", "main")] == [second, first]
