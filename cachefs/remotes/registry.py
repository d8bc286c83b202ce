"""Opens a remote from a URL or a configured name, choosing the backend module by URL scheme.

Backends are imported lazily, so a missing optional library only matters to its own scheme.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlparse

from cachefs.config import Config
from cachefs.errors import ConfigError
from cachefs.remotes.base import Remote

# scheme -> (module, class); one module per backend.
BACKENDS: dict[str, tuple[str, str]] = {
    "file": ("cachefs.remotes.local", "LocalRemote"),
    "s3": ("cachefs.remotes.s3", "S3Remote"),
    "oss": ("cachefs.remotes.oss", "OSSRemote"),
    "haystack": ("cachefs.remotes.haystack", "HaystackRemote"),
}


def open_remote_url(url: str) -> Remote:
    scheme = urlparse(url).scheme
    if scheme not in BACKENDS:
        raise ConfigError(
            f"unsupported remote URL {url!r}: scheme must be one of "
            + ", ".join(f"{s}://" for s in sorted(BACKENDS))
        )
    module_name, class_name = BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"the {scheme}:// remote needs a library that is missing: {e}") from e
    return getattr(module, class_name).from_url(url)


def open_remote(name_or_url: str | None, config: Config | None = None) -> Remote:
    """Open `name_or_url` (a URL, a configured remote name, or None for the default remote)."""
    config = config or Config.load()
    return open_remote_url(config.url_of(name_or_url or config.default_remote))
