"""The Kubernetes manifests in csi/deploy/, checked without a cluster.

They must agree with each other (socket paths, host paths, ports, names) and with the code: the
driver name, the CLI flags our containers pass, the StorageClass parameters the controller reads,
and RBAC grants covering every Kubernetes API call in csi/.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from cachefs import __version__
from cachefs.cli.main import build_parser
from cachefs.peer.protocol import DEFAULT_PORT
from csi import labels
from csi.controller import PARAMETERS
from csi.mounter import PEERS_ENV
from csi.rpc import DRIVER_NAME
from tests.helpers import run_cli
from tests.peers import PeerSet

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "csi" / "deploy"
NAMESPACE = "cachefs"
IMAGE = "ghcr.io/cachefs/cachefs"
KUBELET_DIR = "/var/lib/kubelet"
# Files that are not lists of Kubernetes objects to apply: kustomize's own file, and a
# kube-scheduler configuration file for the control plane.
NOT_OBJECTS = {"kustomization.yaml", "scheduler-config.yaml"}
CLUSTER_SCOPED = {"Namespace", "CSIDriver", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "PersistentVolume"}
WORKLOADS = {"DaemonSet", "Deployment", "Pod"}

# CoreV1Api method -> (resource, verb) it needs. A call in csi/ to a method missing here fails
# test_rbac_covers_every_kubernetes_call: add it here and grant it in rbac.yaml.
KUBE_CALLS: dict[str, tuple[str, str]] = {
    "read_node": ("nodes", "get"),
    "list_node": ("nodes", "list"),
    "patch_node": ("nodes", "patch"),
    "replace_node": ("nodes", "update"),
    "read_node_status": ("nodes/status", "get"),
    "patch_node_status": ("nodes/status", "patch"),
    "read_namespaced_persistent_volume_claim": ("persistentvolumeclaims", "get"),
    "list_namespaced_persistent_volume_claim": ("persistentvolumeclaims", "list"),
    "list_persistent_volume_claim_for_all_namespaces": ("persistentvolumeclaims", "list"),
    "read_persistent_volume": ("persistentvolumes", "get"),
    "list_persistent_volume": ("persistentvolumes", "list"),
    "read_namespaced_pod": ("pods", "get"),
    "list_namespaced_pod": ("pods", "list"),
    "list_pod_for_all_namespaces": ("pods", "list"),
    "create_namespaced_event": ("events", "create"),
}
NODE_ROLE = "cachefs-node"
EXTENDER_ROLE = "cachefs-scheduler-extender"


# ------------------------------------------------------------------------------------ loading


def manifest_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml"))


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def rel(path: Path) -> str:
    return path.relative_to(DEPLOY).as_posix()


def objects(examples: bool = True) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in manifest_files():
        if path.name in NOT_OBJECTS or (not examples and path.parent != DEPLOY):
            continue
        found += [(rel(path), doc) for doc in load(path)]
    return found


def find_all(kind: str, examples: bool = True) -> list[dict[str, Any]]:
    return [doc for _, doc in objects(examples) if doc["kind"] == kind]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in find_all(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in spec["containers"] if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name!r}"
    return matches[0]


def workload_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(file, pod spec, container) for every container of every workload."""
    found = []
    for file, doc in objects():
        if doc["kind"] in WORKLOADS:
            spec = pod_spec(doc)
            found += [(file, spec, c) for c in spec.get("initContainers", []) + spec["containers"]]
    return found


def ours() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(f, s, c) for f, s, c in workload_containers() if c["image"].startswith(IMAGE + ":")]


def flag(args: list[str], name: str) -> str:
    """The value of `--name VALUE` or `--name=VALUE` in a container's args."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    raise AssertionError(f"{name} is not in {args}")


def unix_path(endpoint: str) -> str:
    return endpoint.removeprefix("unix://")


def resolve(spec: dict[str, Any], ctr: dict[str, Any], path: str) -> tuple[str, str]:
    """Where a container path lives: ("hostPath", host path) or ("emptyDir", volume/rest)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    best = None
    for mount in ctr.get("volumeMounts", []):
        mount_path = PurePosixPath(mount["mountPath"])
        if PurePosixPath(path).is_relative_to(mount_path) and (
                best is None or len(mount_path.parts) > len(PurePosixPath(best["mountPath"]).parts)
        ):
            best = mount
    assert best is not None, f"{path} of container {ctr['name']} is on no volume"
    rest = PurePosixPath(path).relative_to(best["mountPath"])
    volume = volumes[best["name"]]
    if "hostPath" in volume:
        return "hostPath", str(PurePosixPath(volume["hostPath"]["path"]) / rest)
    assert "emptyDir" in volume, f"volume {best['name']} is neither hostPath nor emptyDir"
    return "emptyDir", f"{best['name']}/{rest}"


def node_spec() -> dict[str, Any]:
    return pod_spec(find("DaemonSet", "cachefs-node"))


def controller_spec() -> dict[str, Any]:
    return pod_spec(find("Deployment", "cachefs-controller"))


# --------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_every_manifest_parses_and_names_its_objects(path: Path) -> None:
    docs = load(path)
    assert docs, f"{rel(path)} holds no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{rel(path)}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{rel(path)}: apiVersion/kind"
        if path.name not in NOT_OBJECTS:
            assert doc.get("metadata", {}).get("name"), f"{rel(path)}: a {doc['kind']} unnamed"


def test_the_manifests_are_all_there() -> None:
    names = {rel(p) for p in manifest_files()}
    expected = {"kustomization.yaml", "namespace.yaml", "csidriver.yaml", "rbac.yaml",
                "config.yaml", "node.yaml", "controller.yaml", "storageclass.yaml",
                "scheduler-extender.yaml", "scheduler.yaml", "scheduler-config.yaml",
                "examples/static-pv.yaml", "examples/dynamic-pvc.yaml",
                "examples/training-pod.yaml", "examples/ephemeral-pod.yaml", "peers.yaml",
                "examples/peer-networkpolicy.yaml"}
    assert expected <= names, f"missing: {sorted(expected - names)}"


def test_kustomization_lists_every_manifest_and_only_existing_ones() -> None:
    (kustomization,) = load(DEPLOY / "kustomization.yaml")
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a file is listed twice"
    missing = [r for r in resources if not (DEPLOY / r).is_file()]
    assert not missing, f"kustomization.yaml lists files that do not exist: {missing}"
    top_level = {p.name for p in DEPLOY.glob("*.yaml")} - NOT_OBJECTS
    assert set(resources) == top_level, (
        f"not listed: {sorted(top_level - set(resources))}; "
        f"listed but not manifests: {sorted(set(resources) - top_level)}")
    # Each object names its namespace (a kustomize `namespace:` would also move the scheduler's
    # RoleBinding out of kube-system).
    assert "namespace" not in kustomization


def test_namespaced_objects_are_in_the_cachefs_namespace() -> None:
    find("Namespace", NAMESPACE)
    for file, doc in objects(examples=False):
        namespace = doc["metadata"].get("namespace")
        where = f"{file}: {doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] in CLUSTER_SCOPED:
            assert namespace is None, f"{where} is cluster-scoped: no namespace"
        elif doc["kind"] == "RoleBinding" and doc["roleRef"]["name"] == (
                "extension-apiserver-authentication-reader"):
            assert namespace == "kube-system", where
        else:
            assert namespace == NAMESPACE, f"{where} is not in namespace {NAMESPACE}"


def test_volume_mounts_name_volumes_of_their_pod() -> None:
    for file, spec, ctr in workload_containers():
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for mount in ctr.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{file}: {ctr['name']} mounts {mount['name']}"


def test_referenced_accounts_roles_and_configmaps_exist() -> None:
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"])
                for d in find_all("ServiceAccount")}
    for file, doc in objects(examples=False):
        if doc["kind"] in WORKLOADS:
            name = pod_spec(doc).get("serviceAccountName")
            assert (doc["metadata"]["namespace"], name) in accounts, f"{file}: account {name}"
        if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            for subject in doc["subjects"]:
                assert (subject["namespace"], subject["name"]) in accounts, f"{file}: {subject}"
            ref = doc["roleRef"]
            if not ref["name"].startswith(("system:", "extension-apiserver-")):
                find(ref["kind"], ref["name"])
    config_maps = {d["metadata"]["name"] for d in find_all("ConfigMap")}
    for file, spec, _ in workload_containers():
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{file}: {volume}"


# ------------------------------------------------------------------------ driver and volumes


def test_driver_name_is_the_plugins_everywhere() -> None:
    assert DRIVER_NAME == "csi.cachefs.io"
    find("CSIDriver", DRIVER_NAME)
    for storage_class in find_all("StorageClass"):
        assert storage_class["provisioner"] == DRIVER_NAME
    persistent_volumes = find_all("PersistentVolume")
    assert persistent_volumes
    for pv in persistent_volumes:
        assert pv["spec"]["csi"]["driver"] == DRIVER_NAME
    inline = [v["csi"] for d in find_all("Pod") for v in pod_spec(d)["volumes"] if "csi" in v]
    assert inline, "no example of an inline (ephemeral) volume"
    assert all(v["driver"] == DRIVER_NAME for v in inline)
    registrar = container(node_spec(), "node-driver-registrar")
    registration = flag(registrar["args"], "--kubelet-registration-path")
    assert f"/plugins/{DRIVER_NAME}/" in registration


def test_csidriver_spec() -> None:
    spec = find("CSIDriver", DRIVER_NAME)["spec"]
    assert spec["attachRequired"] is False
    # kubelet marks inline volumes (csi.storage.k8s.io/ephemeral) only with podInfoOnMount.
    assert spec["podInfoOnMount"] is True
    assert set(spec["volumeLifecycleModes"]) == {"Persistent", "Ephemeral"}
    assert spec["fsGroupPolicy"] == "None"


def test_storageclass_names_a_version_as_the_controller_reads_it() -> None:
    storage_class = find("StorageClass", "cachefs")
    parameters = storage_class["parameters"]
    assert set(parameters) <= PARAMETERS, f"unknown: {sorted(set(parameters) - PARAMETERS)}"
    assert "dataset" in parameters
    assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer"
    # DeleteVolume only forgets the controller's record: deleting never touches a dataset.
    assert storage_class["reclaimPolicy"] == "Delete"


def test_volume_attributes_are_ones_the_plugin_reads() -> None:
    attributes = [pv["spec"]["csi"]["volumeAttributes"] for pv in find_all("PersistentVolume")]
    attributes += [v["csi"]["volumeAttributes"] for d in find_all("Pod")
                   for v in pod_spec(d)["volumes"] if "csi" in v]
    for attrs in attributes:
        assert set(attrs) <= PARAMETERS and "dataset" in attrs, attrs


def test_static_pv_and_its_claim_bind() -> None:
    pv = find_all("PersistentVolume")[0]
    assert pv["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert pv["spec"]["csi"]["volumeHandle"]
    claims = [c for c in find_all("PersistentVolumeClaim")
              if c["spec"].get("volumeName") == pv["metadata"]["name"]]
    assert len(claims) == 1
    assert claims[0]["spec"]["storageClassName"] == pv["spec"]["storageClassName"] == ""
    assert claims[0]["spec"]["accessModes"] == ["ReadOnlyMany"]
    dynamic = [c for c in find_all("PersistentVolumeClaim")
               if c["spec"].get("storageClassName") == "cachefs"]
    assert dynamic, "no example of a claim using the cachefs StorageClass"


def test_pods_mount_dataset_volumes_read_only_with_host_to_container() -> None:
    claims = {c["metadata"]["name"] for c in find_all("PersistentVolumeClaim")}
    pods = find_all("Pod")
    assert len(pods) >= 2
    for pod in pods:
        spec = pod_spec(pod)
        datasets = {v["name"] for v in spec["volumes"]
                    if v.get("csi", {}).get("driver") == DRIVER_NAME
                    or v.get("persistentVolumeClaim", {}).get("claimName") in claims}
        assert datasets, pod["metadata"]["name"]
        mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", [])
                  if m["name"] in datasets]
        assert mounts, pod["metadata"]["name"]
        for mount in mounts:
            assert mount["mountPropagation"] == "HostToContainer", mount
            assert mount["readOnly"] is True, mount


def test_training_pod_asks_the_cachefs_scheduler() -> None:
    pod = find("Pod", "train-resnet")
    annotations = pod["metadata"]["annotations"]
    assert annotations[labels.GPU_COUNT] == "1"
    assert annotations[labels.DATASETS] == "imagenet@v1"
    spec = pod_spec(pod)
    assert spec["schedulerName"] == "cachefs-scheduler"
    (train,) = spec["containers"]
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert [m["mountPath"] for m in train["volumeMounts"]] == ["/data"]


# ----------------------------------------------------------------------------- node plugin


def test_node_sockets_agree() -> None:
    spec = node_spec()
    plugin = container(spec, "cachefs-plugin")
    mounter = container(spec, "cachefs-mounter")
    registrar = container(spec, "node-driver-registrar")
    probe = container(spec, "liveness-probe")
    csi_socket = resolve(spec, plugin, unix_path(flag(plugin["args"], "--endpoint")))
    assert csi_socket[0] == "hostPath"
    assert resolve(spec, registrar, flag(registrar["args"], "--csi-address")) == csi_socket
    assert resolve(spec, probe, flag(probe["args"], "--csi-address")) == csi_socket
    # kubelet dials the socket at its host path
    assert flag(registrar["args"], "--kubelet-registration-path") == csi_socket[1]
    plugin_dir = next(v for v in spec["volumes"] if v["name"] == "plugin-dir")
    assert plugin_dir["hostPath"]["path"] == f"{KUBELET_DIR}/plugins/{DRIVER_NAME}"
    assert csi_socket[1] == f"{KUBELET_DIR}/plugins/{DRIVER_NAME}/csi.sock"
    registration = next(m for m in registrar["volumeMounts"] if m["mountPath"] == "/registration")
    assert resolve(spec, registrar, registration["mountPath"]) == (
        "hostPath", f"{KUBELET_DIR}/plugins_registry")
    # the mounter serves the socket the plugin dials, on a directory both see
    mounter_socket = resolve(spec, mounter, flag(mounter["args"], "--socket"))
    assert mounter_socket[0] == "hostPath"
    assert resolve(spec, plugin, flag(plugin["args"], "--mounter-socket")) == mounter_socket


def test_node_state_and_cache_dirs_are_shared_host_paths() -> None:
    spec = node_spec()
    plugin = container(spec, "cachefs-plugin")
    mounter = container(spec, "cachefs-mounter")
    for name in ("--state-dir", "--cache-dir"):
        where = resolve(spec, plugin, flag(plugin["args"], name))
        assert where[0] == "hostPath", name
        assert resolve(spec, mounter, flag(mounter["args"], name)) == where, name


def test_kubelet_dir_is_mounted_bidirectionally_where_mounts_are_made() -> None:
    spec = node_spec()
    for volume in spec["volumes"]:
        path = volume.get("hostPath", {}).get("path", "")
        if "kubelet" in path:
            assert path == KUBELET_DIR or path.startswith(KUBELET_DIR + "/"), path
    (kubelet,) = [v for v in spec["volumes"] if v.get("hostPath", {}).get("path") == KUBELET_DIR]
    for name in ("cachefs-plugin", "cachefs-mounter"):
        ctr = container(spec, name)
        (mount,) = [m for m in ctr["volumeMounts"] if m["name"] == kubelet["name"]]
        assert mount["mountPath"] == KUBELET_DIR, name
        assert mount["mountPropagation"] == "Bidirectional", name
    # Kubernetes accepts Bidirectional only in privileged containers
    for file, _, ctr in workload_containers():
        for mount in ctr.get("volumeMounts", []):
            if mount.get("mountPropagation") == "Bidirectional":
                assert ctr.get("securityContext", {}).get("privileged") is True, (
                    f"{file}: {ctr['name']}")


def test_mounter_can_mount_fuse() -> None:
    spec = node_spec()
    mounter = container(spec, "cachefs-mounter")
    security = mounter["securityContext"]
    assert security["privileged"] is True
    assert "SYS_ADMIN" in security["capabilities"]["add"]
    (fuse,) = [v for v in spec["volumes"] if v.get("hostPath", {}).get("path") == "/dev/fuse"]
    assert fuse["hostPath"]["type"] == "CharDevice"
    assert any(m["name"] == fuse["name"] and m["mountPath"] == "/dev/fuse"
               for m in mounter["volumeMounts"])


def test_node_daemonset_runs_everywhere_as_a_critical_pod() -> None:
    spec = node_spec()
    # the inventory reports the node's network interfaces, so the plugin shares the node's
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"], "must tolerate every taint (GPU nodes)"
    env = {e["name"]: e for e in container(spec, "cachefs-plugin")["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    for ctr in spec["containers"]:
        assert ctr["resources"]["requests"], ctr["name"]


@pytest.mark.parametrize("kind,name", [("DaemonSet", "cachefs-node"),
                                       ("Deployment", "cachefs-controller")])
def test_liveness_probe_port_is_the_sidecars(kind: str, name: str) -> None:
    spec = pod_spec(find(kind, name))
    plugin = next(c for c in spec["containers"] if c["image"].startswith(IMAGE + ":"))
    probe_sidecar = container(spec, "liveness-probe")
    port = plugin["livenessProbe"]["httpGet"]["port"]
    assert plugin["livenessProbe"]["httpGet"]["path"] == "/healthz"
    if isinstance(port, str):
        port = next(p["containerPort"] for p in plugin["ports"] if p["name"] == port)
    assert port == int(flag(probe_sidecar["args"], "--health-port"))


def test_controller_socket_is_shared_with_its_sidecars() -> None:
    spec = controller_spec()
    controller = container(spec, "cachefs-controller")
    assert flag(controller["args"], "--mode") == "controller"
    socket = resolve(spec, controller, unix_path(flag(controller["args"], "--endpoint")))
    assert socket[0] == "emptyDir"
    for name in ("csi-provisioner", "liveness-probe"):
        sidecar = container(spec, name)
        assert resolve(spec, sidecar, flag(sidecar["args"], "--csi-address")) == socket, name
    assert "--leader-election" in container(spec, "csi-provisioner")["args"]


# ----------------------------------------------------------------------------- the peer tier

SECRET = "cachefs-credentials"
PEER_SERVICE = "cachefs-peers"


def env_of(ctr: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in ctr.get("env", [])}


def node_labels() -> dict[str, str]:
    return find("DaemonSet", "cachefs-node")["spec"]["template"]["metadata"]["labels"]


def selects_node_pods(selector: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= node_labels().items()


def peer_listen() -> tuple[str, int]:
    host, port = flag(container(node_spec(), "cachefs-peer")["args"], "--listen").rsplit(":", 1)
    return host, int(port)


def test_node_runs_a_peer_server_on_the_mounts_cache_dir() -> None:
    spec = node_spec()
    peer = container(spec, "cachefs-peer")
    mounter = container(spec, "cachefs-mounter")
    args = peer["args"]
    assert args[:2] == ["peer", "serve"]
    cache = resolve(spec, peer, flag(args, "--cache-dir"))
    assert cache[0] == "hostPath"
    assert cache == resolve(spec, mounter, flag(mounter["args"], "--cache-dir"))
    # wildcard, so the probes reach it on loopback; the default port
    assert peer_listen() == ("0.0.0.0", DEFAULT_PORT)
    (declared,) = [p for p in peer["ports"] if p["name"] == "peer"]
    assert (declared["name"], declared["containerPort"], declared["protocol"]) == (
        "peer", DEFAULT_PORT, "TCP")
    assert declared.get("hostPort", DEFAULT_PORT) == DEFAULT_PORT  # hostNetwork: the same
    # known to the ring by the pod's IP: what the headless Service's DNS answer lists
    assert flag(args, "--advertise") == f"$(POD_IP):{DEFAULT_PORT}"
    env = env_of(peer)
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # it fetches for its peers from the remotes named in the mounts' config.toml, with the
    # node's credentials
    assert env["XDG_CONFIG_HOME"]["value"] == env_of(mounter)["XDG_CONFIG_HOME"]["value"]
    config_mounts = [{k: m[k] for k in ("name", "mountPath")} for c in (peer, mounter)
                     for m in c["volumeMounts"] if m["name"] == "config"]
    assert config_mounts[0] == config_mounts[1] and len(config_mounts) == 2
    assert {"secretRef": {"name": SECRET, "optional": True}} in peer["envFrom"]
    # no privileges: it reads and writes files, that is all
    security = peer["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert not any(m.get("mountPropagation") for m in peer["volumeMounts"])
    assert peer["resources"]["requests"]["cpu"] and peer["resources"]["requests"]["memory"]
    assert peer["resources"]["limits"]["memory"]


def test_the_cluster_token_comes_from_the_secret() -> None:
    spec = node_spec()
    peer = container(spec, "cachefs-peer")
    token = env_of(peer)["CACHEFS_TOKEN"]
    assert "value" not in token
    reference = token["valueFrom"]["secretKeyRef"]
    # required: without a token the server would listen on loopback only, useless to peers
    assert (reference["name"], reference["key"]) == (SECRET, "CACHEFS_TOKEN")
    assert not reference.get("optional", False)
    assert "--token-file" not in peer["args"]
    # the mounts' peer calls and the plugin's Status call read it from the same Secret
    for name in ("cachefs-mounter", "cachefs-plugin"):
        assert {"secretRef": {"name": SECRET, "optional": True}} in container(spec, name)[
            "envFrom"], name
    # no token is ever written into a manifest
    for file, _, ctr in workload_containers():
        for name, entry in env_of(ctr).items():
            if "TOKEN" in name or "SECRET" in name:
                assert "value" not in entry, f"{file}: {ctr['name']}: {name} has a literal"
    for file, doc in objects():
        assert doc["kind"] != "Secret", f"{file}: a Secret belongs to the operator"


def test_peer_probes_ask_the_server_for_its_status() -> None:
    peer = container(node_spec(), "cachefs-peer")
    for probe in ("readinessProbe", "livenessProbe"):
        command = peer[probe]["exec"]["command"]
        assert command[:3] == ["cachefs", "peer", "status"], probe
        assert flag(command, "--cache-peers") == f"127.0.0.1:{DEFAULT_PORT}", probe
        build_parser().parse_args(command[1:])  # the CLI takes it as written
        # more than the command's own deadline per member (2 s) plus Python's start
        assert peer[probe]["timeoutSeconds"] >= 5, probe
    readiness, liveness = peer["readinessProbe"], peer["livenessProbe"]
    # readiness decides who is in the ring's DNS answer: it reacts first
    assert (readiness["periodSeconds"] * readiness["failureThreshold"]
            < liveness["periodSeconds"] * liveness["failureThreshold"])


def test_the_probe_command_passes_only_when_the_server_answers_with_the_token(
        tmp_path: Path) -> None:
    """The readiness probe's command against a real token-guarded peer server."""
    command = container(node_spec(), "cachefs-peer")["readinessProbe"]["exec"]["command"]
    servers = PeerSet(tmp_path / "nodes")
    try:
        server = servers.start("node", token="the-cluster-token")
        argv = [a.replace(f"127.0.0.1:{DEFAULT_PORT}", server.address) for a in command]
        argv = [sys.executable, "-m", "cachefs.cli.main", *argv[1:]]
        env = {k: v for k, v in os.environ.items() if k != "CACHEFS_TOKEN"}

        def probe(token: str | None) -> int:
            extra = {"CACHEFS_TOKEN": token} if token else {}
            return subprocess.run(argv, env={**env, **extra}, capture_output=True,
                                  timeout=60, check=False).returncode

        assert probe("the-cluster-token") == 0
        assert probe("another-token") != 0
        assert probe(None) != 0
        # draining: not ready (out of the Service's answer), still alive (not restarted)
        liveness = container(node_spec(), "cachefs-peer")["livenessProbe"]["exec"]["command"]
        alive = [sys.executable, "-m", "cachefs.cli.main",
                 *[a.replace(f"127.0.0.1:{DEFAULT_PORT}", server.address) for a in liveness][1:]]
        run_cli("peer", "drain", server.address, env={"CACHEFS_TOKEN": "the-cluster-token"})
        assert probe("the-cluster-token") != 0
        assert subprocess.run(alive, env={**env, "CACHEFS_TOKEN": "the-cluster-token"},
                              capture_output=True, timeout=60, check=False).returncode == 0
        run_cli("peer", "drain", server.address, "--resume",
                env={"CACHEFS_TOKEN": "the-cluster-token"})
        assert probe("the-cluster-token") == 0
        server.kill()
        assert probe("the-cluster-token") != 0
    finally:
        servers.close()


def test_peers_service_is_headless_over_the_node_pods() -> None:
    service = find("Service", PEER_SERVICE)
    spec = service["spec"]
    assert spec["clusterIP"] == "None"
    assert spec.get("publishNotReadyAddresses", False) is False  # Ready peers only
    assert selects_node_pods(spec["selector"])
    for file, doc in objects():  # and no other pods
        if doc["kind"] in WORKLOADS and doc["metadata"]["name"] != "cachefs-node":
            labels_ = (doc["metadata"].get("labels") if doc["kind"] == "Pod"
                       else doc["spec"]["template"]["metadata"]["labels"]) or {}
            assert not spec["selector"].items() <= labels_.items(), file
    (port,) = spec["ports"]
    assert port["port"] == DEFAULT_PORT and port["protocol"] == "TCP"
    peer = container(node_spec(), "cachefs-peer")
    target = port["targetPort"]
    if isinstance(target, str):
        target = next(p["containerPort"] for p in peer["ports"] if p["name"] == target)
    assert target == peer_listen()[1]


def test_every_mount_joins_the_ring_the_configmap_names() -> None:
    config = find("ConfigMap", "cachefs-config")
    members = config["data"]["cache-peers"]
    scheme, host, port = members.split(":")
    assert scheme == "dns"
    assert host == f"{PEER_SERVICE}.{NAMESPACE}.svc.cluster.local"
    assert int(port) == peer_listen()[1]
    mounter = container(node_spec(), "cachefs-mounter")
    assert PEERS_ENV == "CACHEFS_CACHE_PEERS"
    reference = env_of(mounter)[PEERS_ENV]["valueFrom"]["configMapKeyRef"]
    assert (reference["name"], reference["key"]) == ("cachefs-config", "cache-peers")
    assert reference["optional"] is True  # no key: no peer tier, the mounter still runs
    # the membership is the operator's: no flag hides another one in the DaemonSet
    assert "--cache-peers" not in mounter["args"]
    # the plugin asks the peer server beside it for the inventory
    plugin = container(node_spec(), "cachefs-plugin")
    assert flag(plugin["args"], "--peer-address") == f"127.0.0.1:{peer_listen()[1]}"


def covers(entry: dict[str, Any], port: int) -> bool:
    """Whether a NetworkPolicy port entry covers TCP `port` (no port: every port)."""
    if entry.get("protocol", "TCP") != "TCP":
        return False
    if "port" not in entry:
        return True
    first = entry["port"]
    if isinstance(first, str):
        return first == "peer"
    return first <= port <= entry.get("endPort", first)


def test_network_policy_lets_only_the_node_pods_reach_the_peer_port() -> None:
    (policy,) = find_all("NetworkPolicy")
    assert policy["metadata"]["namespace"] == NAMESPACE
    spec = policy["spec"]
    assert selects_node_pods(spec["podSelector"]["matchLabels"])
    assert spec["policyTypes"] == ["Ingress"]
    port = peer_listen()[1]
    to_peer = [rule for rule in spec["ingress"]
               if not rule.get("ports") or any(covers(p, port) for p in rule["ports"])]
    assert len(to_peer) == 1, "one rule, and only one, admits traffic to the peer port"
    (rule,) = to_peer
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}, "no namespaceSelector or ipBlock: these pods only"
    assert selects_node_pods(source["podSelector"]["matchLabels"])
    # the pods' other ports stay reachable (the inventory, the health ports)
    others = [p for c in node_spec()["containers"] for p in c.get("ports", [])
              if p["containerPort"] != port]
    assert others
    for declared in others:
        assert any(covers(p, declared["containerPort"]) for r in spec["ingress"] if r is not rule
                   for p in r.get("ports", [])), declared


def test_the_host_network_pod_has_no_port_surprises() -> None:
    spec = node_spec()
    assert spec["hostNetwork"] is True
    # a host-network pod resolves the Service's DNS name only with this policy
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    declared = [p for c in spec["containers"] for p in c.get("ports", [])]
    numbers = [p["containerPort"] for p in declared]
    assert len(numbers) == len(set(numbers)), f"two containers claim one node port: {numbers}"
    assert all(p.get("hostPort", p["containerPort"]) == p["containerPort"] for p in declared)
    # every port a container listens on is declared (it is taken on the node)
    listening = {
        int(flag(container(spec, "cachefs-plugin")["args"], "--inventory-listen")
            .rsplit(":", 1)[1]),
        int(flag(container(spec, "liveness-probe")["args"], "--health-port")),
        int(flag(container(spec, "node-driver-registrar")["args"], "--http-endpoint")
            .rsplit(":", 1)[1]),
        peer_listen()[1],
        # and each cachefs daemon's Prometheus endpoint
        *(int(flag(container(spec, name)["args"], "--metrics-listen").rsplit(":", 1)[1])
          for name in ("cachefs-plugin", "cachefs-mounter", "cachefs-peer")),
    }
    assert listening == set(numbers)
    # the only host-network pod is the node DaemonSet's
    for file, doc in objects():
        if doc["kind"] in WORKLOADS and doc["metadata"]["name"] != "cachefs-node":
            assert not pod_spec(doc).get("hostNetwork"), file


# ------------------------------------------------------------------------ images and flags


def test_our_image_is_one_tag_everywhere() -> None:
    found = ours()
    names = {c["name"] for _, _, c in found}
    assert {"cachefs-plugin", "cachefs-mounter", "cachefs-controller",
            "cachefs-scheduler-extender"} <= names
    for file, _, ctr in found:
        assert ctr["image"] == f"{IMAGE}:{__version__}", f"{file}: {ctr['name']}"
        assert "command" not in ctr, f"{file}: {ctr['name']}: the image's entrypoint is cachefs"


@pytest.mark.parametrize("file,name,args",
                         [(f, c["name"], c["args"]) for f, _, c in ours()],
                         ids=[f"{f}:{c['name']}" for f, _, c in ours()])
def test_our_containers_pass_flags_the_cli_has(file: str, name: str, args: list[str]) -> None:
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{file}: {name}: `cachefs {' '.join(args)}` does not parse: "
                        f"{errors.getvalue().strip()}")


def test_env_vars_in_args_are_defined() -> None:
    for file, _, ctr in workload_containers():
        defined = {e["name"] for e in ctr.get("env", [])}
        for arg in ctr.get("args", []) + ctr.get("command", []):
            for var in re.findall(r"\$\((\w+)\)", arg):
                assert var in defined, f"{file}: {ctr['name']} uses $({var})"


# ------------------------------------------------------------------------------------- RBAC


def kube_calls() -> dict[Path, set[str]]:
    """CoreV1Api methods each source file of csi/ calls."""
    from kubernetes.client import CoreV1Api

    methods = {n for n in dir(CoreV1Api)
               if re.match(r"(read|list|patch|create|delete|replace|connect)_", n)
               and not n.endswith("_with_http_info")}
    calls = {}
    for path in sorted((ROOT / "csi").rglob("*.py")):
        if "proto" in path.relative_to(ROOT / "csi").parts:
            continue
        # Every mention counts, calls and names alike (a method may be called by name,
        # getattr(api, "list_node")).
        found = set(re.findall(r"\w+", path.read_text())) & methods
        if found:
            calls[path] = found
    return calls


def role_of(path: Path) -> str:
    """Which ClusterRole a source file runs under: the extender's, or the node plugin's."""
    return EXTENDER_ROLE if re.search("extender|scheduler", path.stem) else NODE_ROLE


def grants(role: dict[str, Any], resource: str, verb: str) -> bool:
    return any("" in rule.get("apiGroups", [])
               and (resource in rule["resources"] or "*" in rule["resources"])
               and (verb in rule["verbs"] or "*" in rule["verbs"])
               for rule in role["rules"])


def test_rbac_covers_every_kubernetes_call() -> None:
    for path, methods in kube_calls().items():
        source = path.read_text()
        role = find("ClusterRole", role_of(path))
        for method in sorted(methods):
            assert method in KUBE_CALLS, (
                f"{path.relative_to(ROOT)} calls CoreV1Api.{method}: add it to KUBE_CALLS in "
                "this file and grant it in csi/deploy/rbac.yaml")
            resource, verb = KUBE_CALLS[method]
            needed = [verb] + (["watch"] if verb == "list" and "Watch(" in source else [])
            for v in needed:
                assert grants(role, resource, v), (
                    f"{path.relative_to(ROOT)} calls {method}: ClusterRole {role_of(path)} "
                    f"must grant {v} on {resource}")


def test_rbac_grants_what_the_components_are_documented_to_need() -> None:
    node = find("ClusterRole", NODE_ROLE)
    assert grants(node, "nodes", "get") and grants(node, "nodes", "patch")
    extender = find("ClusterRole", EXTENDER_ROLE)
    for resource, verb in [("nodes", "get"), ("nodes", "list"), ("nodes", "watch"),
                           ("persistentvolumeclaims", "get"), ("persistentvolumes", "get")]:
        assert grants(extender, resource, verb), (resource, verb)
    controller = find("ClusterRole", "cachefs-controller")
    provisioner = {"persistentvolumes": ["get", "list", "watch", "create", "delete"],
                   "persistentvolumeclaims": ["get", "list", "watch", "update"],
                   "events": ["list", "watch", "create", "update", "patch"],
                   "nodes": ["get", "list", "watch"]}
    for resource, verbs in provisioner.items():
        for verb in verbs:
            assert grants(controller, resource, verb), (resource, verb)
    for name in ("cachefs-controller-leader-election", "cachefs-scheduler-leader-election"):
        role = find("Role", name)
        assert any("coordination.k8s.io" in r["apiGroups"] and "leases" in r["resources"]
                   and {"get", "create", "update"} <= set(r["verbs"]) for r in role["rules"])
    bound = {(b["roleRef"]["name"], s["name"]) for b in find_all("ClusterRoleBinding")
             for s in b["subjects"]}
    for role_name, account in [(NODE_ROLE, "cachefs-node"),
                               ("cachefs-controller", "cachefs-controller"),
                               (EXTENDER_ROLE, "cachefs-scheduler-extender"),
                               ("system:kube-scheduler", "cachefs-scheduler"),
                               ("system:volume-scheduler", "cachefs-scheduler")]:
        assert (role_name, account) in bound, (role_name, account)
    assert pod_spec(find("DaemonSet", "cachefs-node"))["serviceAccountName"] == "cachefs-node"
    extender_pod = pod_spec(find("Deployment", "cachefs-scheduler-extender"))
    assert extender_pod["serviceAccountName"] == "cachefs-scheduler-extender"


# ------------------------------------------------------------------------------- scheduling


def scheduler_configs() -> dict[str, dict[str, Any]]:
    config_map = find("ConfigMap", "cachefs-scheduler-config")
    (embedded,) = [yaml.safe_load(text) for text in config_map["data"].values()]
    (standalone,) = load(DEPLOY / "scheduler-config.yaml")
    return {"scheduler.yaml": embedded, "scheduler-config.yaml": standalone}


def test_scheduler_configs_call_the_extender_service() -> None:
    service = find("Service", "cachefs-scheduler-extender")
    deployment = find("Deployment", "cachefs-scheduler-extender")
    spec = pod_spec(deployment)
    extender = container(spec, "cachefs-scheduler-extender")
    listen_port = int(flag(extender["args"], "--listen").rsplit(":", 1)[1])
    assert service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items())
    configs = scheduler_configs()
    extenders = {name: config["extenders"] for name, config in configs.items()}
    assert extenders["scheduler.yaml"] == extenders["scheduler-config.yaml"]
    for name, config in configs.items():
        assert config["apiVersion"] == "kubescheduler.config.k8s.io/v1", name
        assert config["kind"] == "KubeSchedulerConfiguration", name
        (entry,) = config["extenders"]
        url = urlsplit(entry["urlPrefix"])
        assert url.scheme == "http" and entry["enableHTTPS"] is False, name
        assert url.hostname in (f"cachefs-scheduler-extender.{NAMESPACE}.svc",
                                f"cachefs-scheduler-extender.{NAMESPACE}.svc.cluster.local"), name
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        target = port["targetPort"]
        if isinstance(target, str):
            target = next(p["containerPort"] for p in extender["ports"] if p["name"] == target)
        assert target == listen_port, name
        assert (entry["filterVerb"], entry["prioritizeVerb"]) == ("filter", "prioritize"), name
        assert entry["ignorable"] is True and entry["nodeCacheCapable"] is False, name
        assert entry["weight"] == 5 and entry["httpTimeout"] == "5s", name
    profiles = [p["schedulerName"] for p in configs["scheduler.yaml"]["profiles"]]
    assert profiles == ["cachefs-scheduler"]
    assert [p["schedulerName"] for p in configs["scheduler-config.yaml"]["profiles"]] == [
        "default-scheduler"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert extender[probe]["httpGet"]["path"] == "/healthz"


def test_second_scheduler_reads_its_config_and_elects_under_its_own_lease() -> None:
    spec = pod_spec(find("Deployment", "cachefs-scheduler"))
    (scheduler,) = spec["containers"]
    assert scheduler["image"].startswith("registry.k8s.io/kube-scheduler:v1.")
    config_path = PurePosixPath(flag(scheduler["command"], "--config"))
    (mount,) = [m for m in scheduler["volumeMounts"]
                if config_path.is_relative_to(m["mountPath"])]
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    config_map = find("ConfigMap", volume["configMap"]["name"])
    assert config_path.name in config_map["data"]
    election = scheduler_configs()["scheduler.yaml"]["leaderElection"]
    assert election["resourceName"] == "cachefs-scheduler"
    assert election["resourceNamespace"] == NAMESPACE
