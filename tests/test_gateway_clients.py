"""The gateway with the clients users have: the aws CLI, rclone, s3fs-fuse and curl.

Each reads a version through a real `cachefs gateway` (AWS Signature V4 with a keys file, or a
bearer token for curl) and what it got is compared with the dataset itself, or, for the s3fs
mount, `diff -r` against a `cachefs checkout` of the same version. The tools come from
scripts/setup.sh: Debian's rclone, s3fs and curl, and the aws CLI (pip `awscli`) in its own
virtual environment at .venv/awscli, since it pins its own botocore.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway import (
    TEST_KEY_ID,
    TEST_SECRET,
    GatewayServer,
    home_env,
    make_dataset,
    write_keys,
)
from tests.helpers import run_cli

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parent.parent
AWS_CLI = REPO / ".venv" / "awscli" / "bin" / "aws"
TOOL_TIMEOUT_S = 120


def tool(name: str) -> str:
    path = str(AWS_CLI) if name == "aws" else shutil.which(name)
    assert path and os.path.exists(path), f"{name} is missing: run scripts/setup.sh"
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("gateway-clients")
    env = home_env(root / "home")
    data = make_dataset(root / "src", env)
    keys = write_keys(root / "keys.toml", {TEST_KEY_ID: TEST_SECRET})
    token = root / "token"
    token.write_text("curl-token\n")
    with GatewayServer(root, "--s3-keys", str(keys), "--token-file", str(token),
                       env=env) as server:
        yield {**data, "root": root, "server": server, "env": env}


def tool_env(root: Path) -> dict[str, str]:
    """The test keys and nothing of the machine's AWS or rclone configuration."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RCLONE_"))}
    env.update(AWS_ACCESS_KEY_ID=TEST_KEY_ID, AWS_SECRET_ACCESS_KEY=TEST_SECRET,
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(root / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(root / "no-aws-credentials"),
               AWS_EC2_METADATA_DISABLED="true", HOME=str(root))
    return env


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, env=env,
                          timeout=TOOL_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{argv[0]} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_aws_cli_ls_and_recursive_copy(site: dict, tmp_path: Path) -> None:
    server: GatewayServer = site["server"]
    env = tool_env(tmp_path)
    aws = [tool("aws"), "--endpoint-url", server.endpoint]
    refs = run([*aws, "s3", "ls", "s3://photos/"], env).stdout
    assert "PRE main/" in refs and "PRE v1/" in refs
    listing = run([*aws, "s3", "ls", "s3://photos/v1/odd/"], env).stdout
    for name in ("with space.txt", "plus+equals=.bin", "ünïcödé.txt"):
        assert name in listing
    dst = tmp_path / "copy"
    run([*aws, "s3", "cp", "--recursive", "s3://photos/v1/", str(dst)], env)
    assert files_under(dst) == site["v1"]
    bad = subprocess.run([*aws, "s3", "ls", "s3://photos/v1/"], capture_output=True, text=True,
                         timeout=TOOL_TIMEOUT_S, check=False,
                         env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert bad.returncode != 0 and "SignatureDoesNotMatch" in bad.stderr


def test_rclone_lists_and_copies_a_version(site: dict, tmp_path: Path) -> None:
    server: GatewayServer = site["server"]
    env = tool_env(tmp_path)
    env.update(RCLONE_CONFIG_GW_TYPE="s3", RCLONE_CONFIG_GW_PROVIDER="Other",
               RCLONE_CONFIG_GW_ENV_AUTH="false", RCLONE_CONFIG_GW_ACCESS_KEY_ID=TEST_KEY_ID,
               RCLONE_CONFIG_GW_SECRET_ACCESS_KEY=TEST_SECRET,
               RCLONE_CONFIG_GW_REGION="us-east-1", RCLONE_CONFIG_GW_ENDPOINT=server.endpoint,
               RCLONE_CONFIG=str(tmp_path / "rclone.conf"))
    rclone = tool("rclone")
    listed = run([rclone, "lsf", "-R", "--files-only", "gw:photos/v1"], env).stdout
    assert sorted(listed.splitlines()) == sorted(site["v1"])
    dst = tmp_path / "copy"
    run([rclone, "copy", "gw:photos/v1", str(dst)], env)
    assert files_under(dst) == site["v1"]
    # A version named by its commit hash reads the same.
    commit = site["commits"]["v1"]
    run([rclone, "copy", f"gw:photos/{commit}/odd", str(tmp_path / "by-hash")], env)
    assert files_under(tmp_path / "by-hash") == {
        k.removeprefix("odd/"): v for k, v in site["v1"].items() if k.startswith("odd/")}


def test_s3fs_mount_matches_a_checkout(site: dict, tmp_path: Path) -> None:
    server: GatewayServer = site["server"]
    checkout = tmp_path / "checkout"
    run_cli("checkout", "photos@v1", str(checkout), env=site["env"])
    passwd = tmp_path / "s3fs.passwd"
    passwd.write_text(f"{TEST_KEY_ID}:{TEST_SECRET}\n")
    passwd.chmod(0o600)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [tool("s3fs"), "photos:/v1", str(mnt), "-f", "-o", f"url={server.endpoint}",
         "-o", "use_path_request_style", "-o", f"passwd_file={passwd}", "-o", "ro",
         "-o", "endpoint=us-east-1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr \
                else "s3fs exited"
            assert time.monotonic() < deadline, "s3fs did not mount in 30 s"
            time.sleep(0.05)
        diff = subprocess.run(["diff", "-r", str(checkout), str(mnt)], capture_output=True,
                              text=True, timeout=TOOL_TIMEOUT_S, check=False)
        assert diff.returncode == 0, diff.stdout[-3000:] + diff.stderr[-3000:]
    finally:
        for fusermount in ("fusermount", "fusermount3"):
            if shutil.which(fusermount) and os.path.ismount(mnt):
                subprocess.run([fusermount, "-u", "-z", str(mnt)], capture_output=True,
                               timeout=30, check=False)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        if proc.stderr is not None:
            proc.stderr.close()


def test_curl_ranges_and_conditional_gets(site: dict, tmp_path: Path) -> None:
    server: GatewayServer = site["server"]
    curl = [tool("curl"), "-sS", "-H", "Authorization: Bearer curl-token"]
    url = f"{server.endpoint}/photos/v1/shard.bin"
    data = site["v1"]["shard.bin"]
    out = tmp_path / "out"
    status = run([*curl, "-o", str(out), "-w", "%{http_code}", "-r", "1000-70999", url],
                 os.environ.copy()).stdout
    assert status == "206" and out.read_bytes() == data[1000:71000]
    headers = run([*curl, "-I", url], os.environ.copy()).stdout
    etag = next(line.split(":", 1)[1].strip() for line in headers.splitlines()
                if line.lower().startswith("etag:"))
    status = run([*curl, "-o", str(out), "-w", "%{http_code}", "-H",
                  f"If-None-Match: {etag}", url], os.environ.copy()).stdout
    assert status == "304"
    status = run([*curl, "-o", str(out), "-w", "%{http_code}", "-z", "Jan 1 2000", url],
                 os.environ.copy()).stdout
    assert status == "200" and out.read_bytes() == data
    status = run([tool("curl"), "-sS", "-o", str(out), "-w", "%{http_code}", url],
                 os.environ.copy()).stdout
    assert status == "403"  # no token
    status = run([*curl, "-o", str(out), "-w", "%{http_code}", "--path-as-is",
                  f"{server.endpoint}/photos/v1/../../etc/passwd"], os.environ.copy()).stdout
    assert status == "400"
