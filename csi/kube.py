"""The Kubernetes API client of the node plugin and the scheduler extender.

In a pod, `core_api()` uses the in-cluster configuration (the service account token and CA that
kubelet mounts, and KUBERNETES_SERVICE_HOST/PORT). Outside a cluster (or in tests, against a
local server that checks requests as the API server would), `--kube-api URL` and
`--kube-token-file FILE` point it elsewhere.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cachefs.errors import ConfigError

log = logging.getLogger("cachefs.csi.kube")


def core_api(api_url: str | None = None, token_file: str | None = None) -> Any:
    """A `kubernetes.client.CoreV1Api`: in-cluster unless `api_url` is given."""
    from kubernetes import client, config

    if api_url is None:
        try:
            config.load_incluster_config()
        except config.ConfigException as e:
            raise ConfigError(f"not running in a Kubernetes pod ({e}); give --kube-api URL "
                              "to reach an API server from outside the cluster") from e
        return client.CoreV1Api()
    configuration = client.Configuration()
    configuration.host = api_url.rstrip("/")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --kube-token-file {token_file}: {e}") from e
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
    return client.CoreV1Api(client.ApiClient(configuration))
