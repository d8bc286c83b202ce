"""The scheduler extender over a real socket: ExtenderArgs as kube-scheduler sends them.

kube-scheduler encodes k8s.io/kube-scheduler/extender/v1 types, which have no JSON tags: the
request's fields are `Pod`, `Nodes` (a v1.NodeList, null when nodeCacheCapable) and `NodeNames`
(null otherwise); the answers `Nodes`, `NodeNames`, `FailedNodes`,
`FailedAndUnresolvableNodes`, `Error`, and `[{"Host", "Score"}]`.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi import extender, labels
from csi.extender_server import MAX_BODY, NO_API, ExtenderServer, build_server
from csi.kube import core_api
from tests.kube_api import FakeKubeAPI
from tests.servers import LOOPBACK, free_port, wait_until

COMMIT_V1 = "abcd1234" + "0" * 56
COMMIT_MAIN = "beef5678" + "1" * 56
COMMIT_COCO = "c0c0" + "2" * 60
GiB = 1 << 30


# -- documents shaped like the scheduler's ----------------------------------------------------


def pod(annotations: dict[str, str] | None = None, volumes: list[dict[str, Any]] | None = None,
        name: str = "train-0", namespace: str = "ml") -> dict[str, Any]:
    """A v1.Pod as kube-scheduler marshals it (pending, not yet bound)."""
    return {
        "metadata": {"name": name, "namespace": namespace,
                     "uid": "6f1c2a4e-8a8e-4c55-9b1c-0c5d7a1e0b11", "resourceVersion": "4711",
                     "creationTimestamp": "2025-01-01T00:00:00Z",
                     "labels": {"app": "train"}, "annotations": annotations or {}},
        "spec": {
            "volumes": (volumes or []) + [{"name": "kube-api-access-x", "projected": {
                "sources": [{"serviceAccountToken": {"expirationSeconds": 3607,
                                                     "path": "token"}}],
                "defaultMode": 420}}],
            "containers": [{"name": "train", "image": "pytorch:2", "resources": {
                "limits": {"nvidia.com/gpu": "8"}, "requests": {"cpu": "8"}},
                "volumeMounts": [{"name": v["name"], "mountPath": f"/data/{v['name']}"}
                                 for v in volumes or []]}],
            "restartPolicy": "Never", "schedulerName": "default-scheduler",
            "serviceAccountName": "default", "priority": 0,
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
        },
        "status": {"phase": "Pending", "qosClass": "Burstable"},
    }


def node(name: str, node_labels: dict[str, str] | None = None,
         inventory: dict[str, Any] | None = None) -> dict[str, Any]:
    """A v1.Node as the scheduler's node list holds it."""
    annotations = {"node.alpha.kubernetes.io/ttl": "0",
                   "volumes.kubernetes.io/controller-managed-attach-detach": "true"}
    if inventory is not None:
        annotations[labels.INVENTORY] = json.dumps(inventory)
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "123",
                     "creationTimestamp": "2025-01-01T00:00:00Z",
                     "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                **(node_labels or {})},
                     "annotations": annotations},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {
            "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110"},
            "allocatable": {"cpu": "63", "memory": "500Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True",
                            "lastHeartbeatTime": "2025-01-01T00:00:00Z",
                            "lastTransitionTime": "2025-01-01T00:00:00Z",
                            "reason": "KubeletReady", "message": "kubelet is posting ready"}],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"},
                          {"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": "v1.31.0", "architecture": "amd64",
                         "operatingSystem": "linux"},
        },
    }


def inventory(gpus: int | None = None, models: list[str] | None = None,
              rdma: list[str] | None = None,
              datasets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"node": "n", "cpu": {"count": 64}, "memory": {"bytes": 512 * GiB},
                           "datasets": datasets or []}
    if gpus is not None:
        doc["gpus"] = {"count": gpus, "models": models or []}
    if rdma is not None:
        doc["rdma"] = {"devices": rdma}
    return doc


def cached(dataset: str, commit: str, refs: list[str], size: int) -> dict[str, Any]:
    return {"dataset": dataset, "commit": commit, "refs": refs, "bytes_cached": size,
            "fraction_cached": 0.5}


def args_full(p: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Pod": p, "Nodes": {"metadata": {}, "items": nodes}, "NodeNames": None}


def args_names(p: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {"Pod": p, "Nodes": None, "NodeNames": names}


def csi_volume(name: str, dataset: str, ref: str | None = None,
               driver: str = "csi.cachefs.io") -> dict[str, Any]:
    attributes = {"dataset": dataset, **({"ref": ref} if ref else {})}
    return {"name": name, "csi": {"driver": driver, "readOnly": True,
                                  "volumeAttributes": attributes}}


def pvc_volume(name: str, claim: str) -> dict[str, Any]:
    return {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}


# -- a client --------------------------------------------------------------------------------


class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        assert self.headers.get("Content-Type") == "application/json"
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Answer:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()


def post(port: int, path: str, document: Any) -> Any:
    answer = request(port, "POST", path, json.dumps(document).encode(),
                     {"Content-Type": "application/json"})
    assert answer.status == 200, answer.body
    return answer.json()


def items(result: dict[str, Any]) -> list[str]:
    return [n["metadata"]["name"] for n in result["Nodes"]["items"]]


def scores(result: list[dict[str, Any]]) -> dict[str, int]:
    assert all(set(p) == {"Host", "Score"} for p in result)
    return {p["Host"]: p["Score"] for p in result}


# -- fixtures --------------------------------------------------------------------------------


def start(api: Any = None) -> ExtenderServer:
    return build_server(f"{LOOPBACK}:0", api).start()


@pytest.fixture
def server() -> Iterator[ExtenderServer]:
    """An extender without API access."""
    srv = start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[FakeKubeAPI, ExtenderServer]]:
    """A fake API server and an extender that reads it."""
    with FakeKubeAPI() as api:
        token = tmp_path / "token"
        token.write_text(api.token)
        srv = start(core_api(api.url, str(token)))
        try:
            yield api, srv
        finally:
            srv.stop()


def port_of(srv: ExtenderServer) -> int:
    return int(srv.server_address[1])


GPU_NODES = [
    node("a", {labels.GPU_COUNT: "8", labels.GPU_MODEL: "NVIDIA-H100-80GB-HBM3",
               labels.RDMA: "true"}),
    node("b", {labels.GPU_COUNT: "4", labels.GPU_MODEL: "NVIDIA-A100-SXM4-40GB",
               labels.RDMA: "false"}),
    node("c"),  # nothing published
    node("d", inventory=inventory(8, ["NVIDIA H100 80GB HBM3"], ["mlx5_0", "mlx5_1"])),
    node("e", inventory=inventory(rdma=[])),  # published, no GPUs, no RDMA devices
]


# -- filter ----------------------------------------------------------------------------------


def test_filter_gpu_count(server: ExtenderServer) -> None:
    result = post(port_of(server), "/filter",
                  args_full(pod({labels.GPU_COUNT: "8"}), GPU_NODES))
    assert items(result) == ["a", "d"]
    assert result["NodeNames"] is None
    assert result["Error"] == ""
    assert result["FailedNodes"] == {}
    assert result["FailedAndUnresolvableNodes"] == {
        "b": "needs 8 GPUs, node has 4",
        "c": extender.NO_INVENTORY,
        "e": "needs 8 GPUs, node has 0",
    }
    # The passing nodes come back as they were sent, whole.
    assert result["Nodes"]["items"][0] == GPU_NODES[0]
    assert result["Nodes"]["items"][1] == GPU_NODES[3]


def test_filter_gpu_model_is_normalised_and_case_insensitive(server: ExtenderServer) -> None:
    result = post(port_of(server), "/filter",
                  args_full(pod({labels.GPU_MODEL: "nvidia h100 80gb hbm3"}), GPU_NODES))
    assert items(result) == ["a", "d"]
    reasons = result["FailedAndUnresolvableNodes"]
    assert reasons["b"] == ("needs GPU model nvidia-h100-80gb-hbm3, node has "
                            "NVIDIA-A100-SXM4-40GB")
    assert reasons["c"] == extender.NO_INVENTORY
    assert reasons["e"] == "needs 1 GPU, node has 0"
    # Count and model together: both reasons are given.
    result = post(port_of(server), "/filter", args_full(
        pod({labels.GPU_COUNT: "8", labels.GPU_MODEL: "NVIDIA-H100-80GB-HBM3"}), GPU_NODES))
    assert items(result) == ["a", "d"]
    assert result["FailedAndUnresolvableNodes"]["b"] == (
        "needs 8 GPUs, node has 4; needs GPU model nvidia-h100-80gb-hbm3, node has "
        "NVIDIA-A100-SXM4-40GB")


def test_filter_rdma(server: ExtenderServer) -> None:
    result = post(port_of(server), "/filter",
                  args_full(pod({labels.RDMA: "true"}), GPU_NODES))
    assert items(result) == ["a", "d"]
    assert result["FailedAndUnresolvableNodes"] == {
        "b": "needs RDMA, node has no RDMA devices",
        "c": extender.NO_INVENTORY,
        "e": "needs RDMA, node has no RDMA devices",
    }
    # rdma: "false" asks for nothing.
    result = post(port_of(server), "/filter",
                  args_full(pod({labels.RDMA: "False"}), GPU_NODES))
    assert items(result) == ["a", "b", "c", "d", "e"]


def test_label_wins_over_inventory(server: ExtenderServer) -> None:
    # The label says 2 GPUs, the inventory 8: labels are what the node plugin published last.
    n = node("x", {labels.GPU_COUNT: "2"}, inventory(8, ["H100"], ["mlx5_0"]))
    result = post(port_of(server), "/filter",
                  args_full(pod({labels.GPU_COUNT: "4", labels.RDMA: "true"}), [n]))
    assert result["FailedAndUnresolvableNodes"] == {"x": "needs 4 GPUs, node has 2"}


def test_unreadable_inventory_is_no_inventory(server: ExtenderServer) -> None:
    broken = node("x")
    broken["metadata"]["annotations"][labels.INVENTORY] = "{not json"
    listed = node("y")
    listed["metadata"]["annotations"][labels.INVENTORY] = "[1, 2]"
    result = post(port_of(server), "/filter",
                  args_full(pod({labels.GPU_COUNT: "1"}), [broken, listed]))
    assert result["FailedAndUnresolvableNodes"] == {"x": extender.NO_INVENTORY,
                                                    "y": extender.NO_INVENTORY}


def test_filter_pod_without_annotations_passes_every_node(server: ExtenderServer) -> None:
    result = post(port_of(server), "/filter", args_full(pod(), GPU_NODES))
    assert items(result) == ["a", "b", "c", "d", "e"]
    assert result["FailedNodes"] == {} and result["FailedAndUnresolvableNodes"] == {}
    assert result["Error"] == ""
    # A zero count asks for nothing either.
    result = post(port_of(server), "/filter",
                  args_full(pod({labels.GPU_COUNT: "0"}), GPU_NODES))
    assert items(result) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("annotation,value,says", [
    (labels.GPU_COUNT, "lots", "is not a whole number"),
    (labels.GPU_COUNT, "-2", "is not a whole number"),
    (labels.RDMA, "maybe", "is not true or false"),
    (labels.GPU_MODEL, "  ", "names no GPU model"),
])
def test_filter_bad_annotation_fails_every_node(
        server: ExtenderServer, annotation: str, value: str, says: str) -> None:
    # Not in Error: the scheduler would drop the node lists (and, with ignorable: true, place
    # the pod anywhere); every node fails with the reason instead, so the pod stays Pending.
    result = post(port_of(server), "/filter", args_full(pod({annotation: value}), GPU_NODES))
    assert result["Error"] == "" and result["FailedNodes"] == {}
    assert result["Nodes"]["items"] == []
    reasons = result["FailedAndUnresolvableNodes"]
    assert set(reasons) == {"a", "b", "c", "d", "e"}
    assert len(set(reasons.values())) == 1
    reason = reasons["a"]
    assert annotation in reason and repr(value) in reason and says in reason
    result = post(port_of(server), "/filter", args_names(pod({annotation: value}), ["a", "b"]))
    assert result["NodeNames"] == [] and set(result["FailedAndUnresolvableNodes"]) == {"a", "b"}


def test_filter_node_names_reads_nodes_through_the_api(
        kube: tuple[FakeKubeAPI, ExtenderServer]) -> None:
    api, srv = kube
    for n in GPU_NODES:
        api.add_node(n["metadata"]["name"], n["metadata"]["labels"],
                     n["metadata"]["annotations"])
    wanted = pod({labels.GPU_COUNT: "8", labels.RDMA: "true"})
    result = post(port_of(srv), "/filter", args_names(wanted, ["a", "b", "d", "ghost"]))
    assert result["Nodes"] is None
    assert result["NodeNames"] == ["a", "d"]
    assert result["FailedAndUnresolvableNodes"] == {
        "b": "needs 8 GPUs, node has 4; needs RDMA, node has no RDMA devices"}
    assert result["FailedNodes"] == {"ghost": "node ghost not found in the Kubernetes API"}
    # A second request within the TTL reuses the list: one API request in all.
    post(port_of(srv), "/filter", args_names(wanted, ["a", "b"]))
    assert [(r.method, r.path) for r in api.requests] == [("GET", "/api/v1/nodes")]
    # A pod that asks for nothing needs no API read at all.
    result = post(port_of(srv), "/filter", args_names(pod(), ["a", "ghost"]))
    assert result["NodeNames"] == ["a", "ghost"]
    assert len(api.requests) == 1


def test_filter_node_names_when_the_api_fails(tmp_path: Path) -> None:
    with FakeKubeAPI() as api:
        token = tmp_path / "token"
        token.write_text(api.token)
        api.add_node("a", {labels.GPU_COUNT: "8"})
        api.fail_status = 503
        srv = start(core_api(api.url, str(token)))
        try:
            result = post(port_of(srv), "/filter",
                          args_names(pod({labels.GPU_COUNT: "1"}), ["a"]))
            assert result["NodeNames"] == []
            assert result["FailedNodes"]["a"].startswith(
                "cannot read Nodes from the Kubernetes API: HTTP 503")
            api.fail_status = None
            result = post(port_of(srv), "/filter",
                          args_names(pod({labels.GPU_COUNT: "1"}), ["a"]))
            assert result["NodeNames"] == ["a"]
        finally:
            srv.stop()


def test_filter_node_names_without_api_access(server: ExtenderServer) -> None:
    result = post(port_of(server), "/filter",
                  args_names(pod({labels.GPU_COUNT: "1"}), ["a", "b"]))
    assert result["NodeNames"] == []
    assert result["FailedNodes"] == {"a": NO_API, "b": NO_API}
    result = post(port_of(server), "/filter", args_names(pod(), ["a", "b"]))
    assert result["NodeNames"] == ["a", "b"] and result["FailedNodes"] == {}


def test_go_field_names_match_without_case(server: ExtenderServer) -> None:
    # Go's decoder matches keys ignoring case; so does the extender.
    result = post(port_of(server), "/filter", {"pod": pod({labels.GPU_COUNT: "8"}),
                                               "nodes": {"items": GPU_NODES[:2]}})
    assert items(result) == ["a"]


# -- prioritize ------------------------------------------------------------------------------

CACHE_NODES = [
    node("a", inventory=inventory(datasets=[
        cached("imagenet", COMMIT_MAIN, ["main"], 8 * GiB),
        cached("imagenet", COMMIT_V1, ["v1"], 2 * GiB),
        cached("coco", COMMIT_COCO, ["main"], 1 * GiB)])),
    node("b", inventory=inventory(datasets=[
        cached("imagenet", COMMIT_MAIN, ["heads/main"], 4 * GiB),
        cached("imagenet", COMMIT_V1, ["v1"], 6 * GiB)])),
    node("c", inventory=inventory(datasets=[cached("other", COMMIT_MAIN, ["main"], 50 * GiB)])),
    node("d"),  # no inventory
]


def test_prioritize_inline_csi_volume(server: ExtenderServer) -> None:
    p = pod(volumes=[csi_volume("imagenet", "imagenet")])  # ref defaults to main
    result = post(port_of(server), "/prioritize", args_full(p, CACHE_NODES))
    assert result == [{"Host": "a", "Score": 10}, {"Host": "b", "Score": 5},
                      {"Host": "c", "Score": 0}, {"Host": "d", "Score": 0}]
    p = pod(volumes=[csi_volume("imagenet", "imagenet", "v1")])
    assert scores(post(port_of(server), "/prioritize", args_full(p, CACHE_NODES))) == {
        "a": 3, "b": 10, "c": 0, "d": 0}
    # A volume of another driver names nothing.
    p = pod(volumes=[csi_volume("x", "imagenet", driver="other.csi.io")])
    assert set(scores(post(port_of(server), "/prioritize",
                           args_full(p, CACHE_NODES))).values()) == {0}


def test_prioritize_datasets_annotation(server: ExtenderServer) -> None:
    # imagenet@v1 + coco@main: a has 2 + 1 GiB, b has 6 GiB.
    p = pod({labels.DATASETS: "imagenet@v1, coco"})
    assert scores(post(port_of(server), "/prioritize", args_full(p, CACHE_NODES))) == {
        "a": 5, "b": 10, "c": 0, "d": 0}
    # The same version named twice (by ref and by commit prefix) counts once.
    p = pod({labels.DATASETS: f"imagenet@main,imagenet@{COMMIT_MAIN[:8]}"},
            volumes=[csi_volume("v", "imagenet", "main")])
    assert scores(post(port_of(server), "/prioritize", args_full(p, CACHE_NODES))) == {
        "a": 10, "b": 5, "c": 0, "d": 0}


def test_prioritize_ref_name_and_commit_prefix(server: ExtenderServer) -> None:
    def score(annotation: str) -> dict[str, int]:
        return scores(post(port_of(server), "/prioritize",
                           args_full(pod({labels.DATASETS: annotation}), CACHE_NODES)))

    assert score(f"imagenet@{COMMIT_V1[:4]}") == {"a": 3, "b": 10, "c": 0, "d": 0}
    assert score(f"imagenet@{COMMIT_V1.upper()[:12]}") == {"a": 3, "b": 10, "c": 0, "d": 0}
    # Three characters are not a commit prefix; an unknown ref matches nothing.
    assert set(score(f"imagenet@{COMMIT_V1[:3]}").values()) == {0}
    assert set(score("imagenet@v9").values()) == {0}
    # A dataset of another name never matches, whatever its refs.
    assert score("other")["c"] == 10


def test_prioritize_nothing_cached_anywhere(server: ExtenderServer) -> None:
    p = pod({labels.DATASETS: "laion@v3"})
    assert post(port_of(server), "/prioritize", args_full(p, CACHE_NODES)) == [
        {"Host": n, "Score": 0} for n in "abcd"]
    # A pod that names no dataset scores 0 everywhere too.
    assert set(scores(post(port_of(server), "/prioritize",
                           args_full(pod(), CACHE_NODES))).values()) == {0}


def peer_section(address: str, live: bool = True) -> dict[str, Any]:
    """An inventory's `peer`, as csi.inventory.peer_info writes it."""
    if not live:
        return {"address": "127.0.0.1:7470", "live": False,
                "error": "peer 127.0.0.1:7470 Status: UNAVAILABLE: connection refused"}
    return {"address": "127.0.0.1:7470", "live": True,
            "server": {"address": address, "served_bytes": 5 * GiB, "origin_bytes": 2 * GiB,
                       "served_from_cache": 900, "served_from_origin": 300}}


def test_a_nodes_peer_is_in_its_facts_and_the_explanation() -> None:
    """The peer serves the node's own cache: its chunks are the node's cached bytes, counted
    once; the explanation names each node's peer and whether it answered."""
    with_peer = inventory(datasets=[cached("imagenet", COMMIT_V1, ["v1"], 2 * GiB)])
    nodes = [node("a", inventory={**with_peer, "peer": peer_section("10.0.0.1:7470")}),
             node("b", inventory={**with_peer, "peer": peer_section("", live=False)}),
             node("c", inventory=with_peer),
             node("d")]
    facts = {extender.node_name(n): extender.node_facts(n) for n in nodes}
    assert facts["a"].peer == extender.PeerFacts("10.0.0.1:7470", True, 5 * GiB, 2 * GiB)
    # no Status answer: known by the address the plugin asked
    assert facts["b"].peer == extender.PeerFacts("127.0.0.1:7470", False)
    assert facts["c"].peer is None and facts["d"].peer is None
    args = extender.parse_args(args_full(pod({labels.DATASETS: "imagenet@v1"}), nodes))
    wanted = extender.pod_datasets(args.pod)
    result = extender.priority_list(args, wanted, facts)
    # a peer adds nothing to the bytes: a, b and c cache the same
    assert scores(result) == {"a": 10, "b": 10, "c": 10, "d": 0}
    assert extender.explain(result, wanted, {**facts, "e": "node e not found"}) == (
        "a=10 (2.0 GiB cached, peer 10.0.0.1:7470 live); "
        "b=10 (2.0 GiB cached, peer 127.0.0.1:7470 down); c=10 (2.0 GiB cached); "
        "d=0 (0 B cached)")
    missing = [*result, {"Host": "e", "Score": 0}]
    assert extender.explain(missing, wanted, {**facts, "e": "node e not found"}).endswith(
        "; e=0 (node e not found)")
    # a malformed peer section is no peer
    for bad in ("x", {"live": True}, {"address": 7}):
        odd = node("x", inventory={**with_peer, "peer": bad})
        assert extender.node_facts(odd).peer is None, bad


def test_prioritize_pvc_through_the_api(kube: tuple[FakeKubeAPI, ExtenderServer]) -> None:
    api, srv = kube
    api.add_pvc("ml", "imagenet-v1", "pv-imagenet-v1")
    api.add_pv("pv-imagenet-v1", "csi.cachefs.io",
               {"remote": "s3://bucket/repo", "dataset": "imagenet", "ref": "v1"})
    api.add_pvc("ml", "scratch", "pv-scratch")
    api.add_pv("pv-scratch", "ebs.csi.aws.com", {"dataset": "imagenet", "ref": "main"})
    api.add_pvc("ml", "pending", "")  # not bound yet
    p = pod(volumes=[pvc_volume("data", "imagenet-v1"), pvc_volume("tmp", "scratch"),
                     pvc_volume("later", "pending"), pvc_volume("gone", "no-such-claim")])
    result = post(port_of(srv), "/prioritize", args_full(p, CACHE_NODES))
    assert scores(result) == {"a": 3, "b": 10, "c": 0, "d": 0}
    paths = {r.path for r in api.requests}
    assert paths == {"/api/v1/namespaces/ml/persistentvolumeclaims/imagenet-v1",
                     "/api/v1/namespaces/ml/persistentvolumeclaims/scratch",
                     "/api/v1/namespaces/ml/persistentvolumeclaims/pending",
                     "/api/v1/namespaces/ml/persistentvolumeclaims/no-such-claim",
                     "/api/v1/persistentvolumes/pv-imagenet-v1",
                     "/api/v1/persistentvolumes/pv-scratch"}
    # A provisioned PV records its commit: it matches by commit, whatever the ref says now.
    api.add_pvc("ml", "provisioned", "pvc-1234")
    api.add_pv("pvc-1234", "csi.cachefs.io",
               {"dataset": "imagenet", "ref": "main", "commit": COMMIT_V1})
    p = pod(volumes=[pvc_volume("data", "provisioned")])
    assert scores(post(port_of(srv), "/prioritize", args_full(p, CACHE_NODES))) == {
        "a": 3, "b": 10, "c": 0, "d": 0}


def test_prioritize_api_error_skips_the_volume(kube: tuple[FakeKubeAPI, ExtenderServer]) -> None:
    api, srv = kube
    api.add_pvc("ml", "imagenet-v1", "pv-imagenet-v1")
    api.add_pv("pv-imagenet-v1", "csi.cachefs.io", {"dataset": "imagenet", "ref": "v1"})
    api.fail_status = 500
    p = pod({labels.DATASETS: "coco"}, volumes=[pvc_volume("data", "imagenet-v1")])
    # The PVC cannot be read: the request still succeeds, scored on what is known.
    assert scores(post(port_of(srv), "/prioritize", args_full(p, CACHE_NODES))) == {
        "a": 10, "b": 0, "c": 0, "d": 0}
    api.fail_status = None
    assert scores(post(port_of(srv), "/prioritize", args_full(p, CACHE_NODES))) == {
        "a": 5, "b": 10, "c": 0, "d": 0}


def test_prioritize_node_names_through_the_api(
        kube: tuple[FakeKubeAPI, ExtenderServer]) -> None:
    api, srv = kube
    for n in CACHE_NODES:
        api.add_node(n["metadata"]["name"], n["metadata"]["labels"],
                     n["metadata"]["annotations"])
    p = pod(volumes=[csi_volume("imagenet", "imagenet", "main")])
    assert post(port_of(srv), "/prioritize", args_names(p, ["b", "a", "ghost"])) == [
        {"Host": "b", "Score": 5}, {"Host": "a", "Score": 10}, {"Host": "ghost", "Score": 0}]


def test_prioritize_node_names_without_api_access(server: ExtenderServer) -> None:
    p = pod({labels.DATASETS: "imagenet"}, volumes=[pvc_volume("data", "claim")])
    assert post(port_of(server), "/prioritize", args_names(p, ["a", "b"])) == [
        {"Host": "a", "Score": 0}, {"Host": "b", "Score": 0}]


def test_scores_round_half_up() -> None:
    assert extender.scores({"a": 20, "b": 1, "c": 3, "d": 0}) == {"a": 10, "b": 1, "c": 2, "d": 0}
    assert extender.scores({"a": 0, "b": 0}) == {"a": 0, "b": 0}
    assert extender.scores({}) == {}


# -- the HTTP surface ------------------------------------------------------------------------


def test_healthz(server: ExtenderServer) -> None:
    answer = request(port_of(server), "GET", "/healthz")
    assert answer.status == 200 and answer.json() == "ok"


@pytest.mark.parametrize("body,says", [
    (b"{not json", "not JSON"),
    (b"", "empty"),
    (b"[]", "JSON object"),
    (b'{"Pod": null, "Nodes": {"items": []}}', "Pod"),
    (b'{"Pod": {"metadata": {}}}', "Nodes"),
    (b'{"Pod": {}, "Nodes": {"items": [{"metadata": {}}]}}', "metadata.name"),
    (b'{"Pod": {}, "NodeNames": "a"}', "NodeNames"),
    (b'{"Pod": {}, "Nodes": {"items": {}}}', "items"),
    (b'{"Pod": {"metadata": {"annotations": {"cachefs.io/gpu-count": 8}}}, "NodeNames": []}',
     "annotations"),
    (b'{"Pod": "\xff"}', "not JSON"),  # not UTF-8
])
@pytest.mark.parametrize("path", ["/filter", "/prioritize"])
def test_malformed_bodies_are_400(server: ExtenderServer, path: str, body: bytes,
                                  says: str) -> None:
    answer = request(port_of(server), "POST", path, body, {"Content-Type": "application/json"})
    assert answer.status == 400
    assert says in answer.json()["error"]


def test_wrong_method_unknown_path_and_oversized_body(server: ExtenderServer) -> None:
    port = port_of(server)
    answer = request(port, "GET", "/filter")
    assert answer.status == 405 and answer.headers["Allow"] == "POST"
    assert "POST" in answer.json()["error"]
    assert request(port, "PUT", "/prioritize", b"{}").status == 405
    answer = request(port, "POST", "/healthz", b"{}")
    assert answer.status == 405 and "GET" in answer.headers["Allow"]
    answer = request(port, "POST", "/bind", b"{}")
    assert answer.status == 404 and "/filter" in answer.json()["error"]
    assert request(port, "GET", "/").status == 404
    # Over the limit: refused from the header, before the body is read.
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.putrequest("POST", "/filter")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(MAX_BODY + 1))
        conn.endheaders(b'{"Pod": ')
        response = conn.getresponse()
        assert response.status == 413
        assert "over the limit" in json.loads(response.read())["error"]
    finally:
        conn.close()
    assert request(port, "GET", "/healthz").status == 200


def test_keep_alive_and_chunked_bodies(server: ExtenderServer) -> None:
    conn = http.client.HTTPConnection(LOOPBACK, port_of(server), timeout=30)
    try:
        for path in ("/filter", "/prioritize", "/filter"):
            body = json.dumps(args_full(pod({labels.GPU_COUNT: "8"}), GPU_NODES)).encode()
            conn.request("POST", path, body=iter([body[:100], body[100:]]),
                         headers={"Content-Type": "application/json"},
                         encode_chunked=True)
            response = conn.getresponse()
            assert response.status == 200
            result = json.loads(response.read())
            if path == "/filter":
                assert items(result) == ["a", "d"]
            else:
                assert len(result) == len(GPU_NODES)
    finally:
        conn.close()


def test_cli_serves_filter(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    log = tmp_path / "extender.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cachefs.cli.main", "scheduler-extender", "-v",
             "--listen", f"{LOOPBACK}:{port}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the extender exited ({proc.returncode}):\n"
                                     + log.read_text())
            try:
                return request(port, "GET", "/healthz").status == 200
            except OSError:
                return False

        wait_until(healthy, 30, f"the scheduler extender on port {port}")
        result = post(port, "/filter", args_full(pod({labels.GPU_COUNT: "8"}), GPU_NODES))
        assert items(result) == ["a", "d"]
        assert result["FailedAndUnresolvableNodes"]["b"] == "needs 8 GPUs, node has 4"
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=10) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise
    text = log.read_text()
    assert "without Kubernetes API access" in text
    assert f"serving http://{LOOPBACK}:{port}" in text
