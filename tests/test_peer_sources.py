"""Where the peer ring's members come from (issue 21): the `--cache-peers` source syntax, DNS
membership re-resolved from a DNS server the test controls (tests/dns_server.py, on 127.0.0.1),
and the haystack masters' node registry with a real 3-master raft group and real
`cachefs peer serve --register` processes:

- malformed sources are clear UsageErrors, and so is a source that fails at start;
- a dns: source follows its records (A and AAAA), keeps its members while the server fails,
  and says so in the membership's state;
- nodes that heartbeat are the ring of a master: source; one that stops leaves it after the
  masters' timeout and comes back when it heartbeats again; a leader failover keeps the ring;
  with every master gone the ring keeps its members; a job-scoped ring (serving=) holds only
  the nodes serving that version;
- a mount takes a dns: source end to end (its peer tier serves it) and `--peer-scope dataset`
  needs a master: source.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cachefs.errors import ConfigError, UsageError
from cachefs.fuse.mount import mount_stats
from cachefs.peer.members import Membership
from cachefs.peer.sources import parse_spec, parse_specs, scoped
from tests.dns_server import DnsServer
from tests.helpers import run_cli
from tests.masters import MasterProcess, group_status, start_group, wait_leader
from tests.mounting import MountSet
from tests.peers import PeerServer, PeerSet
from tests.servers import free_port, wait_until

pytestmark = pytest.mark.timeout(180)

V1 = "imgs@" + "1" * 64
V2 = "text@" + "2" * 64


def sources_of(membership: Membership) -> dict[str, dict]:  # type: ignore[type-arg]
    return {s["source"]: s for s in membership.state()["sources"]}


# --- the syntax ----------------------------------------------------------------------------


def test_sources_are_checked_and_written_canonically(tmp_path: Path) -> None:
    commit = "a" * 64
    assert parse_specs(f"10.0.0.1:7470, dns:peers.svc:07470,file:rel/peers "
                       f"master:hay?refresh=5&serving=ds@{commit} 10.0.0.1:7470") == [
        "10.0.0.1:7470", "dns:peers.svc:7470", f"file:{Path('rel/peers').absolute()}",
        f"master:hay?refresh=5&serving=ds@{commit}"]
    assert parse_spec("dns:peers.svc:7470?nameserver=127.0.0.1") == \
        "dns:peers.svc:7470?nameserver=127.0.0.1:53"
    assert parse_spec("[::1]:7470") == "[::1]:7470"
    assert parse_spec("master:7470") == "master:7470"  # a host named "master", and a port
    bad = {
        "dns:peers.svc": "expected dns:NAME:PORT",
        "dns:peers.svc:70000": "expected dns:NAME:PORT",
        "dns:bad_name!:1": "expected dns:NAME:PORT",
        "master:haystack://10.0.0.1:7700": "expected master:REMOTE",
        "master:hay?serving=ds@main": "serving= expects DATASET@COMMIT",
        "dns:a:1?nameserver=ns.example": "nameserver= expects an IP address",
        "dns:a:1?refresh=0": "refresh= expects seconds",
        "dns:a:1?serving=x": "unknown or repeated option serving",
        "file:": "file: needs a path",
        "peers.svc": "expected HOST:PORT",
        "dsn:peers.svc:1": "each item is HOST:PORT, dns:NAME:PORT",
    }
    for spec, message in bad.items():
        with pytest.raises(UsageError, match=message):
            parse_spec(spec)
    # a job-scoped ring narrows the master: sources only, and needs one
    assert scoped(["10.0.0.1:1", "master:hay?refresh=5"], "ds", commit) == [
        "10.0.0.1:1", f"master:hay?refresh=5&serving=ds@{commit}"]
    with pytest.raises(UsageError, match="needs a master:REMOTE source"):
        scoped(["dns:peers.svc:7470"], "ds", commit)


def test_a_source_that_cannot_be_used_at_start_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read it"):
        Membership([f"file:{tmp_path / 'missing'}"])
    with pytest.raises(UsageError, match=r"--cache-peers-file .*missing"):
        Membership(members_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no remote named 'hay'"):
        Membership(["master:hay"])
    run_cli("remote", "add", "s3ish", "s3://bucket/prefix")
    with pytest.raises(ConfigError, match="not a haystack cluster"):
        Membership(["master:s3ish"])


def test_a_name_without_records_at_start_joins_when_it_gets_them() -> None:
    """DNS that cannot answer yet (a headless Service before its first pod is ready) does not
    stop a mount: the ring starts without those members, says why, and fills when they come."""
    with DnsServer() as dns:
        membership = Membership([f"dns:later.test:7470?nameserver={dns.nameserver}&refresh=0.2",
                                 "10.0.0.9:7470"], probe_interval_s=0.05)
        try:
            assert membership.members() == ["10.0.0.9:7470"]
            (source,) = [s for s in membership.state()["sources"]
                         if s["source"].startswith("dns:")]
            assert "no such name" in source["last_error"]
            membership.start()
            dns.set("later.test", ["192.0.2.5"])
            wait_until(lambda: membership.members() == ["10.0.0.9:7470", "192.0.2.5:7470"], 10,
                       "the new records")
        finally:
            membership.close()


def test_the_system_resolver_and_the_union_of_sources(tmp_path: Path) -> None:
    peers_file = tmp_path / "peers"
    peers_file.write_text("10.0.0.2:7470 # two\n10.0.0.1:7470\n")
    membership = Membership(["dns:localhost:7470", "10.0.0.1:7470", f"file:{peers_file}"],
                            probe_interval_s=0.05)
    try:
        assert membership.members() == ["10.0.0.1:7470", "10.0.0.2:7470", "127.0.0.1:7470"]
        kinds = [s["source"].split(":")[0] for s in membership.state()["sources"]]
        assert kinds == ["static", "dns", "file"]
        membership.start()
        peers_file.write_text("10.0.0.3:7470\n")
        wait_until(lambda: membership.members() == ["10.0.0.1:7470", "10.0.0.3:7470",
                                                    "127.0.0.1:7470"], 10, "the file change")
    finally:
        membership.close()


# --- DNS -----------------------------------------------------------------------------------


def test_dns_membership_follows_the_records_and_survives_a_failing_server() -> None:
    with DnsServer() as dns:
        dns.set("peers.test", ["192.0.2.2", "192.0.2.1", "2001:db8::7"])
        spec = f"dns:peers.test:7470?nameserver={dns.nameserver}&refresh=0.2"
        membership = Membership([spec], probe_interval_s=0.05)
        try:
            first = ["192.0.2.1:7470", "192.0.2.2:7470", "[2001:db8::7]:7470"]
            assert membership.members() == first
            membership.start()
            dns.set("peers.test", ["192.0.2.1", "192.0.2.3"])  # one leaves, one joins
            wait_until(lambda: membership.members() == ["192.0.2.1:7470", "192.0.2.3:7470"],
                       10, "the new records")
            dns.failing = True  # SERVFAIL: the members stay, the state says why
            wait_until(lambda: membership.state()["sources"][0]["last_error"] is not None, 10,
                       "the failure to show")
            source = membership.state()["sources"][0]
            assert "SERVFAIL" in source["last_error"]
            assert membership.members() == ["192.0.2.1:7470", "192.0.2.3:7470"]
            assert membership.live() == membership.members()
            dns.failing = False
            dns.set("peers.test", ["2001:db8::8"])
            wait_until(lambda: membership.members() == ["[2001:db8::8]:7470"], 10,
                       "the answers again")
            assert membership.state()["sources"][0]["last_error"] is None
        finally:
            membership.close()


def test_peer_status_and_a_mount_take_a_dns_source(
        tmp_path: Path, peer_servers: PeerSet, mounts: MountSet) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(bytes(range(256)) * 4096)
    run_cli("init", "ds")
    run_cli("commit", "ds", str(src), "-m", "v1")
    server = peer_servers.start("node0")
    with DnsServer() as dns:
        dns.set("peers.test", ["127.0.0.1"])
        spec = f"dns:peers.test:{server.port}?nameserver={dns.nameserver}"
        doc = json.loads(run_cli("peer", "status", "--cache-peers", spec, "--json").stdout)
        assert doc["live"] == [server.address]
        assert doc["sources"] == [{"source": spec, "members": [server.address]}]
        point = mounts.mount("ds", mounts.mountpoint(), "--remote", "local",
                             "--cache-dir", str(tmp_path / "mount-cache"), "--cache-peers", spec)
        assert (point / "a.bin").read_bytes() == bytes(range(256)) * 4096
        stats = mount_stats(str(point), 5)
        assert stats["peer_hits"] >= 1
        ring = stats["peer_ring"]
        assert ring["members"] == [server.address]
        assert ring["sources"][0]["source"] == spec
    # and the mount refuses what it cannot use, before it starts
    mnt = mounts.mountpoint("refused")
    proc = run_cli("mount", "ds", str(mnt), "--remote", "local", "--cache-peers", "dns:x",
                   check=False)
    assert proc.returncode != 0 and "expected dns:NAME:PORT" in proc.stderr
    proc = run_cli("mount", "ds", str(mnt), "--remote", "local", "--cache-peers",
                   "10.0.0.1:7470", "--peer-scope", "dataset", check=False)
    assert proc.returncode != 0 and "needs a master:REMOTE source" in proc.stderr


# --- the masters' node registry ------------------------------------------------------------


def start_node(peer_servers: PeerSet, name: str, serving: str) -> PeerServer:
    return peer_servers.start(name, extra=("--register", "hay", "--node-name", name,
                                           "--serving", serving,
                                           "--heartbeat-interval", "0.3"))


def test_master_membership_follows_node_heartbeats(
        tmp_path: Path, masters: list[MasterProcess], peer_servers: PeerSet) -> None:
    group = start_group(tmp_path / "masters", 3, masters, extra=["--down-after", "3"])
    leader = wait_leader(group)
    run_cli("remote", "add", "hay", "haystack://" + ",".join(m.address for m in group))
    nodes = [start_node(peer_servers, "n0", V1), start_node(peer_servers, "n1", V1),
             start_node(peer_servers, "n2", V2)]
    everyone = sorted(n.address for n in nodes)
    v1_nodes = sorted(n.address for n in nodes[:2])
    ring = Membership(["master:hay?refresh=0.2"], probe_interval_s=0.05)
    job = Membership([f"master:hay?refresh=0.2&serving={V1}"], probe_interval_s=0.05)
    try:
        ring.start()
        job.start()
        wait_until(lambda: ring.members() == everyone, 20, "every node in the ring")
        wait_until(lambda: job.members() == v1_nodes, 20, "the job's ring")

        # any master answers (a follower forwards to the leader's soft state)
        follower = next(m for m in group if m.id != leader.id)
        with follower.client() as client:
            listed = {n.name: n for n in client.list_nodes()}
            assert sorted(listed) == ["n0", "n1", "n2"]
            assert listed["n2"].serving == (V2,) and listed["n2"].last_seen_s < 3
            assert [n.name for n in client.list_nodes(serving=V2)] == ["n2"]
            with pytest.raises(UsageError, match="expected DATASET@COMMIT"):
                client.register_node("bad", "127.0.0.1:1", serving=["ds@main"])
        doc = json.loads(run_cli("peer", "status", "--cache-peers", "master:hay",
                                 "--json").stdout)
        assert doc["live"] == everyone
        assert doc["sources"] == [{"source": "master:hay", "members": everyone}]

        # a node that stops heartbeating leaves both rings; back, it returns
        gone = nodes[1]
        gone.kill()
        wait_until(lambda: gone.address not in ring.members(), 15,
                   "the silent node to leave")
        wait_until(lambda: gone.address not in job.members(), 15, "... the job's ring too")
        status = group_status(group)
        assert status is not None
        assert {n["name"]: n["state"] for n in status["nodes"]}["n1"] == "down"
        gone.start()
        wait_until(lambda: ring.members() == everyone, 15, "the node to come back")
        wait_until(lambda: gone.address in job.members(), 15, "... to the job's ring too")

        # a drained node stops heartbeating: it leaves the registry's list; resumed, returns
        drained = nodes[0]
        run_cli("peer", "drain", drained.address)
        wait_until(lambda: drained.address not in ring.members(), 15, "the drained node")
        run_cli("peer", "drain", drained.address, "--resume")
        wait_until(lambda: ring.members() == everyone, 15, "the resumed node")

        # a leader failover keeps the ring (the new leader counts every node as just seen)
        leader.kill()
        new_leader = wait_leader([m for m in group if m is not leader])
        elected = time.time()
        wait_until(lambda: (sources_of(ring)["master:hay"]["last_refresh"] or 0) > elected + 0.5,
                   20, "a refresh from the new leader")
        assert ring.members() == everyone
        assert new_leader.id != leader.id

        # with every master gone the source fails and the ring keeps its members
        for m in group:
            m.kill()
        wait_until(lambda: sources_of(ring)["master:hay"]["last_error"] is not None, 20,
                   "the failure to show")
        assert ring.members() == everyone
        assert ring.live() == everyone
    finally:
        ring.close()
        job.close()


def test_a_job_scoped_mount_uses_the_nodes_serving_its_version(
        tmp_path: Path, masters: list[MasterProcess], peer_servers: PeerSet,
        mounts: MountSet) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = bytes(range(256)) * 4096
    (src / "a.bin").write_bytes(data)
    run_cli("init", "ds")
    run_cli("commit", "ds", str(src), "-m", "v1")
    commit = json.loads(run_cli("log", "ds", "--json").stdout)[0]["commit"]
    group = start_group(tmp_path / "masters", 1, masters)
    wait_leader(group)
    run_cli("remote", "add", "hay", f"haystack://{group[0].address}")
    # node0 serves ds@commit through a mount of this machine on its cache dir (found by the
    # server itself); node1 registers nothing
    node0 = peer_servers.start("node0", extra=("--register", "hay", "--node-name", "node0",
                                               "--heartbeat-interval", "0.3"))
    peer_servers.start("node1", extra=("--register", "hay", "--node-name", "node1",
                                       "--heartbeat-interval", "0.3"))
    mounts.mount("ds", mounts.mountpoint("on-node0"), "--remote", "local",
                 "--cache-dir", str(node0.cache_dir))
    version = f"ds@{commit}"
    with group[0].client() as client:
        wait_until(lambda: [n.name for n in client.list_nodes(serving=version)] == ["node0"],
                   20, "node0 to register the version its mount serves")
        assert sorted(n.name for n in client.list_nodes()) == ["node0", "node1"]
    point = mounts.mount("ds", mounts.mountpoint("job"), "--remote", "local",
                         "--cache-dir", str(tmp_path / "job-cache"),
                         "--cache-peers", "master:hay", "--peer-scope", "dataset")
    assert (point / "a.bin").read_bytes() == data
    stats = mount_stats(str(point), 5)
    assert stats["peer_ring"]["members"] == [node0.address]
    assert stats["peer_ring"]["sources"][0]["source"] == f"master:hay?serving={version}"
    assert stats["peer_hits"] >= 1


def test_registration_with_a_wrong_token_fails_and_an_unreachable_cluster_does_not(
        tmp_path: Path, masters: list[MasterProcess], peer_servers: PeerSet) -> None:
    group = start_group(tmp_path / "masters", 1, masters, token="right-token")
    wait_leader(group)
    wrong = tmp_path / "wrong-token"
    wrong.write_text("wrong-token\n")
    run_cli("remote", "add", "hay", f"haystack://{group[0].address}?token_file={wrong}")
    cache = tmp_path / "cache"
    proc = run_cli("peer", "serve", "--cache-dir", str(cache), "--listen",
                   f"127.0.0.1:{free_port()}", "--register", "hay", check=False)
    assert proc.returncode != 0
    assert "token" in proc.stderr.lower() or "denied" in proc.stderr.lower(), proc.stderr
    proc = run_cli("peer", "serve", "--cache-dir", str(cache), "--listen",
                   f"127.0.0.1:{free_port()}", "--serving", V1, check=False)
    assert proc.returncode != 0 and "--serving needs --register REMOTE" in proc.stderr
    # masters that do not answer: the node serves its peers anyway and keeps trying
    run_cli("remote", "add", "gone", f"haystack://127.0.0.1:{free_port()}")
    server = peer_servers.start("lonely", extra=("--register", "gone",
                                                 "--heartbeat-interval", "0.2"))
    wait_until(lambda: "registration failed" in server.output(), 20, "the failure logged")
    assert server.status()["address"] == server.address
