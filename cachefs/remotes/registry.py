"""Opens a remote from a URL or a configured name, choosing the backend module by URL scheme.

Backends are imported lazily, so a missing optional library only matters to its own scheme.
Every backend module has `parse_url(url)`, which checks a URL completely (host or bucket,
options and their values) without connecting, and `from_url` opens what it parsed: so
`check_remote_url` (what `cachefs remote add` asks) refuses exactly the URLs that opening would.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from urllib.parse import ParseResult, parse_qsl, urlparse

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

# Where each backend's credentials come from instead (named when a URL holds some).
_CREDENTIALS_FROM = {
    "file": "a file:// remote needs none",
    "s3": "use the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), a profile or a role",
    "oss": "set OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET in the environment",
    "haystack": "give the cluster token in CACHEFS_TOKEN or token_file=FILE",
}


def url_options(parsed: ParseResult, known: set[str], backend: str) -> dict[str, str]:
    """The query options of a remote URL, refusing any not in `known` (listing the known ones).

    Blank options (``?bogus`` or ``?bogus=``) count: a typo must not pass unnoticed. Messages
    name option names only, never values or the URL (which could hold a secret).
    """
    options: dict[str, str] = {}
    for key, value in parse_qsl(parsed.query, keep_blank_values=True):
        options[key] = value  # the last one wins, as in a query string
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"unknown {backend} remote option(s) {', '.join(unknown)}; known: "
            + (", ".join(sorted(known)) if known else f"none (a {backend} URL takes no options)")
        )
    return options


def int_option(options: dict[str, str], name: str, default: int, backend: str,
               minimum: int = 1) -> int:
    """Option `name` as an integer >= `minimum` (or `default` when absent)."""
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"{backend} remote option {name}={raw!r}: expected an integer of at "
                          f"least {minimum}")
    return value


def _scheme_of(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in BACKENDS:
        shown = f"scheme {parsed.scheme + '://'!r}" if parsed.scheme else "no scheme"
        raise ConfigError(
            f"unsupported remote URL: {shown}; supported: "
            + ", ".join(f"{s}://" for s in sorted(BACKENDS))
        )
    if "@" in parsed.netloc:
        # Before any message could quote the URL: never echo a password.
        raise ConfigError(f"credentials do not belong in a remote URL (user:password@...): "
                          f"{_CREDENTIALS_FROM[parsed.scheme]}")
    return parsed.scheme


def _backend_module(scheme: str) -> ModuleType:
    module_name, _ = BACKENDS[scheme]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"the {scheme}:// remote needs a library that is missing: {e}") from e


def check_remote_url(url: str) -> None:
    """Raise ConfigError unless `url` would open: known scheme, host or bucket present, every
    option known to its backend with a value of the right form. Connects to nothing."""
    _backend_module(_scheme_of(url)).parse_url(url)


def open_remote_url(url: str) -> Remote:
    scheme = _scheme_of(url)
    module = _backend_module(scheme)
    return getattr(module, BACKENDS[scheme][1]).from_url(url)


def open_remote(name_or_url: str | None, config: Config | None = None) -> Remote:
    """Open `name_or_url` (a URL, a configured remote name, or None for the default remote)."""
    config = config or Config.load()
    return open_remote_url(config.url_of(name_or_url or config.default_remote))
