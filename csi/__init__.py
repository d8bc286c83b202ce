"""csi: the Kubernetes CSI driver `csi.cachefs.io`, its mounter, node inventory, scheduler extender.

`plugin.py` serves the CSI services (`identity.py`, `controller.py`, `node.py`; shared parts in
`rpc.py`, persistent state in `state.py`, provisioned volumes' pins in `volume_pins.py`) over one
unix socket; `mounter.py` is the separate process that owns the FUSE mounts and repairs dead or
hung ones; `inventory.py` describes the node and `publish.py` serves and publishes it (through
`kube.py`, with the names of `labels.py`); `extender.py` and `extender_server.py` are the
kube-scheduler extender. The manifests are in `csi/deploy/`.
"""
