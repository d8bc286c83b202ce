"""Pins: gc keeps what a live pin reaches (and nothing once it expired), pins taken while gc
runs, the `cachefs pin` commands, and the pins of real mounts (kept while mounted, removed by
umount, skipped with a warning on a remote the mount cannot write).
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cachefs.config import data_dir
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.gc import collect_garbage
from cachefs.dataset.locks import RepositoryLock
from cachefs.dataset.pins import PIN_PREFIX, LeasedPin, PinLost, PinStore
from cachefs.dataset.repo import Repository
from cachefs.dataset.verify import verify
from cachefs.errors import AlreadyExists, ObjectNotFound
from cachefs.remotes.local import LocalRemote
from tests.helpers import cli_json, run_cli
from tests.mounting import MountSet, daemon_pids, wait_for

CHUNK = 64 * 1024
WAIT_S = 30.0


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def fresh(repo: Repository) -> Repository:
    return Repository(LocalRemote(repo.remote.root))  # type: ignore[attr-defined]


def object_keys(repo: Repository) -> set[str]:
    return {k for prefix in ("chunks/", "trees/", "commits/") for k in repo.remote.list(prefix)}


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(LocalRemote(tmp_path / "repo"))
    r.create_dataset("ds", CHUNK)
    return r


def orphan(repo: Repository, tmp_path: Path, seed: int = 1) -> str:
    """A commit on branch `exp` (its own history), whose branch is then deleted: only the
    reflog reaches it, and gc --grace 0 removes it unless something pins it."""
    src = tmp_path / f"src{seed}"
    (src / "sub").mkdir(parents=True)
    (src / "big.bin").write_bytes(blob(seed, 3 * CHUNK + 7))
    (src / "sub" / "small").write_bytes(blob(seed + 100, 500))
    name = commit_directory(repo, "ds", "exp", src, "v1").commit
    repo.delete_ref("ds", "heads", "exp")
    return name


def test_a_live_pin_keeps_its_version_and_an_expired_one_keeps_nothing(
        repo: Repository, tmp_path: Path) -> None:
    commit = orphan(repo, tmp_path)
    store = PinStore(repo.remote)
    forever = store.add("ds", commit, "forever")
    assert forever.ttl_s is None and not forever.expired()
    leased = store.add("ds", commit, "leased", ttl_s=60)
    assert leased.expires_ns == leased.renewed_ns + 60 * 10**9
    result = collect_garbage(fresh(repo), grace_s=0)
    assert result.garbage_objects == 0 and result.pins == ["forever", "leased"]
    assert verify(fresh(repo), commit).ok

    # The lease is judged from the pin object's mtime (the store's clock): age it past 60 s.
    store.remove("forever")
    old = time.time() - 3600
    os.utime(repo.remote.root / PIN_PREFIX / "leased", (old, old))  # type: ignore[attr-defined]
    assert [p.name for p in store.list()] == ["leased"] and store.live() == []
    result = collect_garbage(fresh(repo), grace_s=0)
    assert result.pins == [] and result.pins_pruned == ["leased"]
    assert result.garbage["commits"].objects == 1 and result.garbage["chunks"].objects == 5
    assert object_keys(fresh(repo)) == set()
    assert store.list() == []


def test_pin_names_and_idempotent_adds(repo: Repository, tmp_path: Path) -> None:
    commit = orphan(repo, tmp_path)
    other = orphan(repo, tmp_path, seed=2)
    store = PinStore(repo.remote)
    generated = store.add("ds", commit)
    assert generated.name.startswith(f"ds-{commit[:12]}-")
    assert store.add("ds", commit, "job").name == "job"
    assert store.add("ds", commit, "job").commit == commit  # a retried request: fine
    with pytest.raises(AlreadyExists, match="already exists"):
        store.add("ds", other, "job")
    with pytest.raises(Exception, match="invalid pin name"):
        store.add("ds", commit, "../escape")
    assert store.remove("job") and not store.remove("job")
    assert not list(repo.remote.list("locks/"))  # the writer locks were released


def test_pinning_a_commit_gc_already_removed_fails_and_leaves_no_pin(
        repo: Repository, tmp_path: Path) -> None:
    commit = orphan(repo, tmp_path)
    collect_garbage(fresh(repo), grace_s=0)
    with pytest.raises(ObjectNotFound, match="no longer stored"):
        PinStore(repo.remote).add("ds", commit, "late")
    assert PinStore(repo.remote).list() == []


def test_a_pin_created_between_gc_passes_is_honoured(repo: Repository, tmp_path: Path) -> None:
    """A mount of a branch starting while gc runs: its pin appears after gc's first (unlocked)
    mark found the version unreachable; the second pass, under the lock, reads it."""
    commit = orphan(repo, tmp_path)

    def pin_then_lock() -> RepositoryLock:
        PinStore(repo.remote).add("ds", commit, "late-mount", ttl_s=600)
        return RepositoryLock(repo.remote, "gc", poll_s=0.02)

    result = collect_garbage(fresh(repo), grace_s=0, lock_factory=pin_then_lock)
    assert result.garbage_objects == 0 and result.pins == ["late-mount"]
    assert verify(fresh(repo), commit).ok


def test_pin_creation_waits_for_a_running_gc_sweep(repo: Repository, tmp_path: Path) -> None:
    commit = orphan(repo, tmp_path)
    gc_lock = RepositoryLock(repo.remote, "gc", poll_s=0.02).acquire()
    waiting = threading.Event()
    outcome: list[object] = []

    def add() -> None:
        store = PinStore(repo.remote, lock_factory=lambda: RepositoryLock(
            repo.remote, "writer", poll_s=0.02, on_wait=lambda _: waiting.set()))
        try:
            outcome.append(store.add("ds", commit, "blocked"))
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=add)
    thread.start()
    try:
        assert waiting.wait(WAIT_S), "pin creation did not wait for gc"
        assert not outcome and PinStore(repo.remote).list() == []
    finally:
        gc_lock.release()
        thread.join(WAIT_S)
    assert len(outcome) == 1 and getattr(outcome[0], "name", None) == "blocked", outcome


def test_gc_during_renewals_keeps_every_pinned_object(repo: Repository, tmp_path: Path) -> None:
    commit = orphan(repo, tmp_path)
    keys = object_keys(repo)
    pin = LeasedPin(PinStore(repo.remote), "ds", commit, "test renewer", "renewing", ttl_s=600)
    pin.create()
    stop = threading.Event()
    renewals = 0
    errors: list[BaseException] = []

    def renew() -> None:
        nonlocal renewals
        while not stop.is_set():
            try:
                pin.renew()
                renewals += 1
            except BaseException as e:
                errors.append(e)
                return

    thread = threading.Thread(target=renew)
    thread.start()
    try:
        for _ in range(5):
            result = collect_garbage(fresh(repo), grace_s=0)
            assert result.pins == ["renewing"] and result.garbage_objects == 0
            assert object_keys(fresh(repo)) == keys
    finally:
        stop.set()
        thread.join(WAIT_S)
    assert not errors and renewals > 5
    assert verify(fresh(repo), commit).ok
    pin.release()
    assert PinStore(repo.remote).list() == []


def test_a_removed_pin_is_not_recreated_and_a_lapsed_one_is_checked(
        repo: Repository, tmp_path: Path) -> None:
    commit = orphan(repo, tmp_path)
    pin = LeasedPin(PinStore(repo.remote), "ds", commit, "test", "held", ttl_s=600)
    pin.create()
    PinStore(repo.remote).remove("held")  # `cachefs pin rm` of a mount's pin
    with pytest.raises(PinLost):
        pin.renew()
    assert PinStore(repo.remote).list() == []

    # A holder that could not renew for half its lease pins again, checking the commit: here
    # gc removed it meanwhile, so the renewal fails instead of reviving a pin of nothing.
    lapsed = LeasedPin(PinStore(repo.remote), "ds", commit, "test", "lapsed", ttl_s=600)
    lapsed.create()
    PinStore(repo.remote).remove("lapsed")
    collect_garbage(fresh(repo), grace_s=0)
    lapsed._written_at = time.monotonic() - 400  # no renewal for 400 s
    with pytest.raises(ObjectNotFound, match="no longer stored"):
        lapsed.renew()
    assert PinStore(repo.remote).list() == []


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_pin_add_list_rm(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(blob(3, 1000))
    run_cli("init", "ds")
    run_cli("commit", "ds", str(src), "-m", "v1")
    run_cli("tag", "ds", "v1")
    commit = cli_json("log", "ds@v1")[0]["commit"]
    added = cli_json("pin", "add", "ds@v1", "--name", "paper")
    assert added["name"] == "paper" and added["commit"] == commit
    assert added["expires"] is None and added["expired"] is False
    leased = cli_json("pin", "add", "ds", "--ttl", "2h")
    assert leased["name"].startswith(f"ds-{commit[:12]}-") and leased["ttl_s"] == 7200
    listed = cli_json("pin", "list")
    assert [p["name"] for p in listed] == sorted([leased["name"], "paper"])
    for row in listed:
        assert set(row) == {"name", "dataset", "commit", "holder", "created", "renewed",
                            "expires", "ttl_s", "expired"}
        assert row["dataset"] == "ds" and row["commit"] == commit and row["holder"]
    text = run_cli("pin", "list").stdout
    assert "paper  ds@" in text and "no expiry" in text and "expires 20" in text
    again = run_cli("pin", "add", "ds@v1", "--name", "paper", check=False)
    assert again.returncode == 0  # the same pin again
    run_cli("commit", "ds", str(src), "-m", "v2", "--allow-empty")
    other = run_cli("pin", "add", "ds@main", "--name", "paper", check=False)
    assert other.returncode == 4 and "already exists" in other.stderr
    assert "removed pin paper" in run_cli("pin", "rm", "paper").stdout
    missing = run_cli("pin", "rm", "paper", check=False)
    assert missing.returncode == 3 and "no pin named paper" in missing.stderr
    bad = run_cli("pin", "add", "ds@v1", "--name", "a/b", check=False)
    assert bad.returncode == 2 and "invalid pin name" in bad.stderr
    bad = run_cli("pin", "add", "ds@v1", "--ttl", "0", check=False)
    assert bad.returncode == 2
    assert "kept what 1 live pins hold" in run_cli("gc", "--grace", "0").stdout


# -- mounts ------------------------------------------------------------------------------------


def make_branch_version(tmp_path: Path) -> dict[str, bytes]:
    """Version v1 on branch `exp` of dataset `ds` in the default (local) remote."""
    files = {"big.bin": blob(10, 5 * CHUNK + 123), "mid.bin": blob(11, CHUNK),
             **{f"small/{i:03d}": blob(20 + i, 300 + 37 * i) for i in range(40)}}
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    run_cli("init", "ds", "--chunk-size", "64KiB")
    run_cli("commit", "ds@exp", str(src), "-m", "v1")
    return files


def read_every_file(root: Path, files: dict[str, bytes]) -> dict[str, str]:
    """What reading each file gives: 'ok', 'WRONG' or the error's errno name."""
    outcome = {}
    for rel, data in files.items():
        try:
            outcome[rel] = "ok" if (root / rel).read_bytes() == data else "WRONG"
        except OSError as e:
            outcome[rel] = errno.errorcode.get(e.errno or 0, str(e))
    return outcome


def mount_options(tmp_path: Path, name: str) -> list[str]:
    # No memory cache and a cache directory of its own: reads after gc go to the remote.
    return ["--memory-cache", "0", "--cache-dir", str(tmp_path / f"cache-{name}"),
            "--timeout", "5"]


def test_a_mounted_branch_survives_its_deletion_and_gc(tmp_path: Path, mounts: MountSet) -> None:
    """The issue's scenario: mount a branch, delete it, gc with no grace, read everything."""
    files = make_branch_version(tmp_path)
    pinned = mounts.mount("ds@exp", mounts.mountpoint("pinned"), *mount_options(tmp_path, "p"))
    unpinned = mounts.mount("ds@exp", mounts.mountpoint("unpinned"), "--no-pin",
                            *mount_options(tmp_path, "u"))
    assert cli_json("stats", str(pinned))["pinned"] is True
    assert "pinned" not in cli_json("stats", str(unpinned))
    (pin,) = cli_json("pin", "list")
    assert pin["dataset"] == "ds" and str(pinned) in pin["holder"] and not pin["expired"]
    assert pin["ttl_s"] == 600 and pin["holder"].split(" pid ")[1].split()[0].isdigit()

    run_cli("branch", "ds", "-d", "exp")
    result = cli_json("gc", "--grace", "0")
    assert result["pins"] == [pin["name"]] and result["garbage_objects"] == 0
    assert set(read_every_file(pinned, files).values()) == {"ok"}

    # Without the pin (as before pins existed) the same gc removes what the mount shows.
    run_cli("umount", str(pinned))
    assert cli_json("pin", "list") == []  # umount removed the mount's pin
    result = cli_json("gc", "--grace", "0")
    assert result["garbage"]["chunks"]["objects"] > 0
    outcome = read_every_file(unpinned, files)
    assert "ok" not in outcome.values() and set(outcome.values()) <= {"EIO", "ETIMEDOUT"}, outcome


@pytest.mark.skipif(os.getuid() != 0, reason="a read-only bind mount needs root (CI is root)")
def test_a_mount_on_a_read_only_remote_mounts_unpinned(tmp_path: Path, mounts: MountSet) -> None:
    files = make_branch_version(tmp_path)
    repo_dir = data_dir() / "repo"
    ro = tmp_path / "ro-repo"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(repo_dir), str(ro)], check=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True, timeout=30)
        mnt = mounts.mount("ds@exp", mounts.mountpoint(), "--remote", f"file://{ro}",
                           *mount_options(tmp_path, "ro"))
        figures = cli_json("stats", str(mnt))
        assert figures["pinned"] is False and figures["pin"].startswith("mount-")
        assert set(read_every_file(mnt, files).values()) == {"ok"}
        ours = [m for m in cli_json("mounts") if m["mountpoint"] == str(mnt)]
        log_text = Path(ours[0]["log_file"]).read_text()
        assert log_text.count("could not pin") == 1 and "mounted anyway" in log_text
        assert cli_json("pin", "list") == []
        run_cli("umount", str(mnt))
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True, timeout=30, check=False)


def test_a_killed_mounts_pin_expires_and_gc_prunes_it(tmp_path: Path, mounts: MountSet) -> None:
    make_branch_version(tmp_path)
    mnt = mounts.mount("ds@exp", mounts.mountpoint(), *mount_options(tmp_path, "k"))
    (pid,) = daemon_pids(mnt)  # `cachefs mounts` lists every mount of the machine
    os.kill(int(pid), 9)
    wait_for(lambda: not Path(f"/proc/{pid}").exists()
             or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", what="daemon death")
    (pin,) = cli_json("pin", "list")  # left behind by the kill: its lease runs out
    assert pin["expires"] is not None
    path = data_dir() / "repo" / "pins" / pin["name"]
    old = time.time() - 601
    os.utime(path, (old, old))
    assert cli_json("pin", "list")[0]["expired"] is True
    result = cli_json("gc", "--grace", "0")
    assert result["pins_pruned"] == [pin["name"]]
    assert json.loads(run_cli("pin", "list", "--json").stdout) == []
