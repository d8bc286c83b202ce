"""The scheduler extender's decisions, on plain JSON documents (no HTTP, no API access here).

kube-scheduler posts `ExtenderArgs` (k8s.io/kube-scheduler/extender/v1) to the extender's filter
and prioritize verbs. Those Go types have no JSON tags, so their fields travel capitalized
(`Pod`, `Nodes`, `NodeNames`; answers `Nodes`, `NodeNames`, `FailedNodes`,
`FailedAndUnresolvableNodes`, `Error`; `Host`, `Score`), and Go's decoder matches keys without
regard to case: so does `parse_args`. The Pod and the Nodes inside are ordinary core/v1 objects.

**Filter.** A pod asks with its annotations, named like the node labels it must match:
`cachefs.io/gpu-count: "8"` (at least that many GPUs), `cachefs.io/gpu-model: "NVIDIA H100 80GB
HBM3"` (compared after `label_value()` normalisation, ignoring case: "nvidia-h100-80gb-hbm3"
matches the label NVIDIA-H100-80GB-HBM3), `cachefs.io/rdma: "true"`. A node's facts are its
labels of the same names; a label that is missing falls back to the node's `cachefs.io/inventory`
annotation (gpus.count, gpus.models, rdma.devices). A node with neither cannot serve a pod that
asks for anything ("no cachefs inventory published"); a pod that asks for nothing passes every
node. Failing nodes go to FailedAndUnresolvableNodes with the reason ("needs 8 GPUs, node has
4"): preempting pods there would not add hardware, so the scheduler must not try. A pod whose
annotation cannot be read (gpu-count "lots") fails every node the same way, the reason naming
the annotation, so it stays Pending with that message in its events. Error stays empty on
purpose: kube-scheduler discards the node lists of an answer with an Error, and an extender
configured `ignorable: true` would then let the pod land anywhere, its request ignored.

**Prioritize.** A pod's dataset versions come from its inline CSI volumes of csi.cachefs.io
(volumeAttributes dataset / ref / commit), its `cachefs.io/datasets: "imagenet@v1,coco"`
annotation (ref defaults to main) and its PVCs bound to csi.cachefs.io PVs (looked up by the
server). A node's cached versions are the "datasets" of its inventory annotation; a wanted
`dataset@ref` matches an entry of that dataset whose refs include ref, or whose commit starts
with ref when ref is a hex prefix of at least 4 characters (a volume that records its commit
matches by commit only). Per wanted version the best matching entry counts (bytes_cached), each
entry once. Score = round(10 * bytes on the node / the most bytes on any candidate node), half
up; 0 everywhere when nothing is cached anywhere.

**Peers.** A node's inventory may carry its peer server (`peer`: the address the peer ring knows
it by, and whether it answered its Status). That server serves the node's own cache directory,
so the chunks it holds are the node's cached bytes, already counted above, each once. What it
adds is the explanation (`explain`, which the server logs per prioritize): each node's score
with its cached bytes and its peer, live or down (a down peer means the node's cached chunks
reach no other node until it is back).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cachefs.names import format_size, is_hash_prefix
from csi import labels
from csi.rpc import DRIVER_NAME

log = logging.getLogger("cachefs.csi.extender")

MAX_SCORE = 10  # extenderv1.MaxExtenderPriority
NO_INVENTORY = "no cachefs inventory published"


class BadArgs(ValueError):
    """The request body is not an ExtenderArgs document."""


class BadPodRequest(ValueError):
    """The pod's cachefs annotations cannot be read."""


# -- the request --------------------------------------------------------------------------------


def go_field(document: dict[str, Any], name: str) -> Any:
    """`document[name]` matched as Go's encoding/json does: exactly, else ignoring case."""
    if name in document:
        return document[name]
    folded = name.casefold()
    for key, value in document.items():
        if isinstance(key, str) and key.casefold() == folded:
            return value
    return None


def node_name(node: Any) -> str:
    metadata = node.get("metadata") if isinstance(node, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name:
        raise BadArgs("every node in ExtenderArgs.Nodes.items needs metadata.name")
    return name


@dataclass
class ExtenderArgs:
    pod: dict[str, Any]
    node_list: dict[str, Any] | None  # the NodeList as sent (full objects), or None
    node_names: list[str]  # the candidates, in the order given, whichever form was sent

    @property
    def names_only(self) -> bool:
        return self.node_list is None

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return list(self.node_list["items"]) if self.node_list is not None else []


def parse_args(document: Any) -> ExtenderArgs:
    """An ExtenderArgs from its decoded JSON; BadArgs saying what is wrong."""
    if not isinstance(document, dict):
        raise BadArgs("the request body must be a JSON object (ExtenderArgs)")
    pod = go_field(document, "Pod")
    if not isinstance(pod, dict):
        raise BadArgs("ExtenderArgs.Pod must be a Pod object")
    metadata = pod.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadArgs("ExtenderArgs.Pod.metadata must be an object")
    annotations = (metadata or {}).get("annotations")
    if annotations is not None and not (
            isinstance(annotations, dict)
            and all(isinstance(v, str) for v in annotations.values())):
        raise BadArgs("ExtenderArgs.Pod.metadata.annotations must map strings to strings")
    nodes = go_field(document, "Nodes")
    names = go_field(document, "NodeNames")
    if nodes is not None:
        if not isinstance(nodes, dict):
            raise BadArgs("ExtenderArgs.Nodes must be a NodeList object")
        items = nodes.get("items")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise BadArgs("ExtenderArgs.Nodes.items must be a list of Node objects")
        node_list = {**nodes, "items": items}
        return ExtenderArgs(pod, node_list, [node_name(n) for n in items])
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise BadArgs("ExtenderArgs.NodeNames must be a list of node names")
        return ExtenderArgs(pod, None, list(names))
    raise BadArgs("ExtenderArgs needs Nodes (full objects) or NodeNames (nodeCacheCapable)")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def pod_annotations(pod: dict[str, Any]) -> dict[str, str]:
    return dict(_dict(_dict(pod.get("metadata")).get("annotations")))


def pod_label(pod: dict[str, Any]) -> str:
    metadata = _dict(pod.get("metadata"))
    return f"{metadata.get('namespace') or 'default'}/{metadata.get('name') or '?'}"


# -- what a pod asks, what a node has ---------------------------------------------------------


@dataclass(frozen=True)
class Requirements:
    gpu_count: int = 0
    gpu_model: str | None = None  # normalised: label_value(), lower case
    rdma: bool = False

    @property
    def any(self) -> bool:
        return bool(self.gpu_count or self.gpu_model or self.rdma)


def normalise_model(text: str) -> str:
    return labels.label_value(text).lower()


def pod_requirements(pod: dict[str, Any]) -> Requirements:
    """What the pod's annotations ask for; BadPodRequest naming the annotation that is bad."""
    annotations = pod_annotations(pod)
    gpu_count = 0
    text = annotations.get(labels.GPU_COUNT)
    if text is not None:
        value = text.strip()
        if not value.isdecimal():
            raise BadPodRequest(f"annotation {labels.GPU_COUNT}: {text!r} is not a whole number "
                                "of GPUs")
        gpu_count = int(value)
    gpu_model = None
    text = annotations.get(labels.GPU_MODEL)
    if text is not None:
        gpu_model = normalise_model(text)
        if not gpu_model:
            raise BadPodRequest(f"annotation {labels.GPU_MODEL}: {text!r} names no GPU model")
    rdma = False
    text = annotations.get(labels.RDMA)
    if text is not None:
        value = text.strip().lower()
        if value not in ("true", "false"):
            raise BadPodRequest(f"annotation {labels.RDMA}: {text!r} is not true or false")
        rdma = value == "true"
    return Requirements(gpu_count, gpu_model, rdma)


@dataclass(frozen=True)
class CachedVersion:
    dataset: str
    commit: str
    refs: tuple[str, ...]
    bytes_cached: int


@dataclass(frozen=True)
class PeerFacts:
    """The node's peer server as its inventory reports it."""

    address: str  # the address the ring knows it by (its Status's), else where it was asked
    live: bool
    served_bytes: int | None = None
    origin_bytes: int | None = None  # read from the origin on behalf of the other nodes


@dataclass(frozen=True)
class NodeFacts:
    published: bool = False  # cachefs labels or an inventory annotation
    gpu_count: int | None = None
    gpu_models: tuple[str, ...] = ()  # as published (shown in reasons)
    rdma: bool | None = None
    cached: tuple[CachedVersion, ...] = field(default_factory=tuple)
    peer: PeerFacts | None = None


@dataclass(frozen=True)
class _Inventory:
    gpu_count: int | None = None
    gpu_models: tuple[str, ...] = ()
    rdma: bool | None = None
    cached: tuple[CachedVersion, ...] = ()
    peer: PeerFacts | None = None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value.strip())
    return None


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, dict):  # a device record: {"model": ...} or {"name": ...}
                item = item.get("model") or item.get("name")
            if isinstance(item, str) and item and item not in out:
                out.append(item)
        return tuple(out)
    return ()


def _peer(document: Any) -> PeerFacts | None:
    """The inventory's `peer` section (`csi.inventory.peer_info`), or None."""
    if not isinstance(document, dict):
        return None
    server = _dict(document.get("server"))
    address = server.get("address") or document.get("address")
    if not isinstance(address, str) or not address:
        return None
    return PeerFacts(address, document.get("live") is True, _int(server.get("served_bytes")),
                     _int(server.get("origin_bytes")))


@lru_cache(maxsize=4096)
def parse_inventory(text: str) -> _Inventory | None:
    """The parts of an inventory annotation the extender uses; None when it is not JSON."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):  # logged once per distinct text (cached)
        log.warning("ignoring a Node annotation %s that is not a JSON object: %.80r",
                    labels.INVENTORY, text)
        return None
    gpus = document.get("gpus")
    gpu_count = gpu_models = None
    if isinstance(gpus, dict):
        gpu_count = _int(gpus.get("count"))
        gpu_models = _strings(gpus.get("models"))
        if gpu_count is None and isinstance(gpus.get("devices"), list):
            gpu_count = len(gpus["devices"])
        if not gpu_models:
            gpu_models = _strings(gpus.get("devices"))
    elif isinstance(gpus, list):  # a list of devices
        gpu_count, gpu_models = len(gpus), _strings(gpus)
    rdma_doc = document.get("rdma")
    rdma = None
    if isinstance(rdma_doc, dict):
        devices = rdma_doc.get("devices")
        if isinstance(devices, list):
            rdma = bool(devices)
        elif _int(devices) is not None:
            rdma = (_int(devices) or 0) > 0
        elif _int(rdma_doc.get("count")) is not None:
            rdma = (_int(rdma_doc.get("count")) or 0) > 0
    elif isinstance(rdma_doc, list):
        rdma = bool(rdma_doc)
    elif isinstance(rdma_doc, bool):
        rdma = rdma_doc
    cached = []
    for entry in document.get("datasets") or []:
        if not isinstance(entry, dict):
            continue
        dataset, commit = entry.get("dataset"), entry.get("commit")
        if not isinstance(dataset, str) or not isinstance(commit, str):
            continue
        refs = tuple(_ref_name(r) for r in _strings(entry.get("refs")))
        cached.append(CachedVersion(dataset, commit.lower(), refs,
                                    max(_int(entry.get("bytes_cached")) or 0, 0)))
    return _Inventory(gpu_count, gpu_models or (), rdma, tuple(cached),
                      _peer(document.get("peer")))


def node_facts(node: dict[str, Any]) -> NodeFacts:
    """A Node object's facts: its cachefs labels, else its inventory annotation."""
    metadata = _dict(node.get("metadata"))
    node_labels = _dict(metadata.get("labels"))
    annotation = _dict(metadata.get("annotations")).get(labels.INVENTORY)
    inventory = None
    if isinstance(annotation, str):
        inventory = parse_inventory(annotation)
    published = inventory is not None or any(
        k in node_labels for k in (labels.GPU_COUNT, labels.GPU_MODEL, labels.RDMA))
    inventory = inventory or _Inventory()
    gpu_count = _int(node_labels.get(labels.GPU_COUNT))
    if gpu_count is None:
        gpu_count = inventory.gpu_count
    model = node_labels.get(labels.GPU_MODEL)
    gpu_models = (model,) if isinstance(model, str) and model else inventory.gpu_models
    rdma_label = str(node_labels.get(labels.RDMA, "")).strip().lower()
    rdma = {"true": True, "false": False}.get(rdma_label, inventory.rdma)
    return NodeFacts(published, gpu_count, gpu_models, rdma, inventory.cached, inventory.peer)


def check_node(wants: Requirements, facts: NodeFacts) -> str | None:
    """Why the node cannot take the pod, or None when it can."""
    if not wants.any:
        return None
    if not facts.published:
        return NO_INVENTORY
    reasons = []
    has = facts.gpu_count or 0
    needs = max(wants.gpu_count, 1 if wants.gpu_model else 0)
    if has < needs:
        reasons.append(f"needs {needs} GPU{'s' if needs != 1 else ''}, node has {has}")
    if wants.gpu_model and has and not any(
            normalise_model(m) == wants.gpu_model for m in facts.gpu_models):
        shown = ", ".join(facts.gpu_models) or "an unknown model"
        reasons.append(f"needs GPU model {wants.gpu_model}, node has {shown}")
    if wants.rdma and not facts.rdma:
        reasons.append("needs RDMA, node has no RDMA devices")
    return "; ".join(reasons) or None


# -- the datasets a pod reads, and where they are cached ------------------------------------


@dataclass(frozen=True)
class WantedVersion:
    dataset: str
    ref: str = "main"
    commit: str | None = None  # known when the volume recorded it (a provisioned PV)

    def __str__(self) -> str:
        return f"{self.dataset}@{self.commit or self.ref}"


def _ref_name(ref: str) -> str:
    for prefix in ("refs/heads/", "refs/tags/", "heads/", "tags/"):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    return ref


def version_from_attributes(attributes: Any) -> WantedVersion | None:
    """The version a csi.cachefs.io volume names (volumeAttributes / volume context)."""
    if not isinstance(attributes, dict):
        return None
    dataset = attributes.get("dataset")
    if not isinstance(dataset, str) or not dataset:
        return None
    ref = attributes.get("ref")
    commit = attributes.get("commit")
    return WantedVersion(dataset, ref if isinstance(ref, str) and ref else "main",
                         commit.lower() if isinstance(commit, str) and commit else None)


def parse_datasets_annotation(text: str) -> list[WantedVersion]:
    """`imagenet@v1, coco` -> imagenet@v1, coco@main (a :PATH suffix is ignored)."""
    wanted = []
    for item in text.split(","):
        address = item.strip().split(":", 1)[0]
        dataset, _, ref = address.partition("@")
        dataset, ref = dataset.strip(), ref.strip()
        if dataset:
            wanted.append(WantedVersion(dataset, ref or "main"))
        elif address:
            log.warning("annotation %s: ignoring %r (no dataset name)", labels.DATASETS, item)
    return wanted


def pod_volumes(pod: dict[str, Any]) -> list[dict[str, Any]]:
    volumes = _dict(pod.get("spec")).get("volumes") or []
    return [v for v in volumes if isinstance(v, dict)] if isinstance(volumes, list) else []


def pod_claims(pod: dict[str, Any]) -> list[str]:
    """The PVC names the pod's volumes use (generic ephemeral volumes: POD-VOLUME)."""
    claims = []
    pod_name = _dict(pod.get("metadata")).get("name") or ""
    for volume in pod_volumes(pod):
        source = volume.get("persistentVolumeClaim")
        if isinstance(source, dict) and isinstance(source.get("claimName"), str):
            claims.append(source["claimName"])
        elif isinstance(volume.get("ephemeral"), dict) and pod_name and volume.get("name"):
            claims.append(f"{pod_name}-{volume['name']}")
    return claims


def pod_datasets(pod: dict[str, Any]) -> list[WantedVersion]:
    """The versions a pod names itself: inline csi.cachefs.io volumes and the annotation."""
    wanted = []
    for volume in pod_volumes(pod):
        source = volume.get("csi")
        if isinstance(source, dict) and source.get("driver") == DRIVER_NAME:
            version = version_from_attributes(source.get("volumeAttributes"))
            if version is not None:
                wanted.append(version)
    text = pod_annotations(pod).get(labels.DATASETS)
    if text:
        wanted.extend(parse_datasets_annotation(text))
    return wanted


def matches(wanted: WantedVersion, entry: CachedVersion) -> bool:
    if entry.dataset != wanted.dataset:
        return False
    if wanted.commit is not None:
        return entry.commit.startswith(wanted.commit)
    if _ref_name(wanted.ref) in entry.refs:
        return True
    prefix = wanted.ref.lower()
    return is_hash_prefix(prefix) and entry.commit.startswith(prefix)


def cached_bytes(wanted: Iterable[WantedVersion], facts: NodeFacts) -> int:
    """Bytes of the wanted versions the node caches: per version its best entry, each once."""
    chosen: dict[tuple[str, str], int] = {}
    for version in wanted:
        candidates = [e for e in facts.cached if matches(version, e)]
        if candidates:
            best = max(candidates, key=lambda e: e.bytes_cached)
            chosen[(best.dataset, best.commit)] = best.bytes_cached
    return sum(chosen.values())


def scores(bytes_by_node: dict[str, int]) -> dict[str, int]:
    """0-10 by cached bytes relative to the best node (rounded half up); all 0 when none."""
    most = max(bytes_by_node.values(), default=0)
    if most <= 0:
        return dict.fromkeys(bytes_by_node, 0)
    return {name: (2 * MAX_SCORE * b + most) // (2 * most) for name, b in bytes_by_node.items()}


def dedupe(wanted: Iterable[WantedVersion]) -> list[WantedVersion]:
    return list(dict.fromkeys(wanted))


# -- the answers ------------------------------------------------------------------------------


def filter_result(args: ExtenderArgs, facts: dict[str, NodeFacts | str]) -> dict[str, Any]:
    """ExtenderFilterResult. `facts` maps each candidate to its facts, or to why they are
    unknown (a names-only request the API could not answer); unknown nodes go to FailedNodes
    (the scheduler retries), nodes without what the pod asks to FailedAndUnresolvableNodes."""
    failed: dict[str, str] = {}
    unresolvable: dict[str, str] = {}
    try:
        wants = pod_requirements(args.pod)
    except BadPodRequest as e:
        unresolvable = dict.fromkeys(args.node_names, str(e))
    else:
        for name in args.node_names:
            if not wants.any:
                continue
            known = facts.get(name)
            if isinstance(known, NodeFacts):
                reason = check_node(wants, known)
                if reason:
                    unresolvable[name] = reason
            else:
                failed[name] = known or "node facts unknown"
    passing = [n for n in args.node_names if n not in failed and n not in unresolvable]
    result: dict[str, Any] = {"Nodes": None, "NodeNames": None, "FailedNodes": failed,
                              "FailedAndUnresolvableNodes": unresolvable, "Error": ""}
    if args.names_only:
        result["NodeNames"] = passing
    else:
        assert args.node_list is not None
        keep = set(passing)
        result["Nodes"] = {**args.node_list,
                           "items": [n for n in args.nodes if node_name(n) in keep]}
    return result


def priority_list(args: ExtenderArgs, wanted: list[WantedVersion],
                  facts: dict[str, NodeFacts | str]) -> list[dict[str, Any]]:
    """HostPriorityList: every candidate with its 0-10 score."""
    bytes_by_node = {}
    for name in args.node_names:
        known = facts.get(name)
        bytes_by_node[name] = cached_bytes(wanted, known) if isinstance(known, NodeFacts) else 0
    scored = scores(bytes_by_node)
    return [{"Host": name, "Score": scored[name]} for name in args.node_names]


def explain(priorities: list[dict[str, Any]], wanted: list[WantedVersion],
            facts: dict[str, NodeFacts | str]) -> str:
    """Why each node got its score: the bytes of the wanted versions it caches, and its peer
    server (the module doc, "Peers"). One clause per node, in the order scored."""
    clauses = []
    for entry in priorities:
        name, score = entry["Host"], entry["Score"]
        known = facts.get(name)
        if not isinstance(known, NodeFacts):
            clauses.append(f"{name}={score} ({known or 'no facts'})")
            continue
        text = f"{name}={score} ({format_size(cached_bytes(wanted, known))} cached"
        if known.peer is not None:
            state = "live" if known.peer.live else "down"
            text += f", peer {known.peer.address} {state}"
        clauses.append(text + ")")
    return "; ".join(clauses)
