"""Names shared by the node inventory, its publication on Node objects and the scheduler extender.

The same keys serve as Node labels (what a node has, set by the node plugin) and as Pod
annotations (what a pod asks for, read by the scheduler extender), so a pod's request reads like
the node fact it must match: `cachefs.io/gpu-count: "8"`.
"""

from __future__ import annotations

import re

GPU_COUNT = "cachefs.io/gpu-count"
GPU_MODEL = "cachefs.io/gpu-model"
RDMA = "cachefs.io/rdma"
INVENTORY = "cachefs.io/inventory"  # Node annotation: the inventory JSON
DATASETS = "cachefs.io/datasets"  # Pod annotation: "imagenet@v1,coco@main"

_LABEL_VALUE_MAX = 63
_INVALID = re.compile(r"[^A-Za-z0-9._-]+")


def label_value(text: str) -> str:
    """`text` as a valid label value: runs of other characters become '-', at most 63
    characters, starting and ending alphanumeric ("NVIDIA H100 80GB HBM3" -> NVIDIA-H100-80GB-HBM3).
    """
    value = _INVALID.sub("-", text)[:_LABEL_VALUE_MAX]
    return value.strip("-._")
