# syntax=docker/dockerfile:1
# The cachefs image: the `cachefs` CLI, the CSI plugin and its mounter, the scheduler extender.
#
#   docker build -t ghcr.io/cachefs/cachefs:0.1.0 .
#
# Two stages: the first compiles (pyfuse3 against libfuse3, the Cython extension
# cachefs._lookup) into wheels; the second installs those wheels next to the FUSE runtime, with
# no compiler and no test dependencies.
#
# Privileges at runtime: the node DaemonSet's mounter container mounts FUSE file systems and
# read-only bind mounts that must show up in the host's mount namespace, where kubelet hands them
# to pods. That takes CAP_SYS_ADMIN, the host's /dev/fuse, and Bidirectional mount propagation
# of /var/lib/kubelet, which Kubernetes only allows in privileged containers (so the node
# plugin container is privileged too). The image therefore runs as root; the controller and the
# scheduler extender need no privileges (the extender's Deployment runs it as nobody).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# gcc's C library headers (libc6-dev) are only a recommendation of gcc: name them.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc libc6-dev libfuse3-dev patch pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# A wheel of cachefs (not editable; Cython comes from [build-system]) and of every runtime
# dependency: pyfuse3 with cachefs's patch (patches/), downloaded as binary wheels otherwise.
RUN scripts/build_pyfuse3.sh /wheels \
 && pip wheel --no-cache-dir --find-links /wheels --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1
# fuse3: fusermount3 (the mounter's lazy unmount of a dead mount) and libfuse3 (pyfuse3);
# mount/util-linux: mount --bind, umount -l (the mounter's bind mounts).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        fuse3 libfuse3-3 mount util-linux \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
 && cachefs --version
ENTRYPOINT ["cachefs"]
CMD ["--help"]
