"""User configuration: where things live (XDG paths) and the named remotes in config.toml.

The file is `$XDG_CONFIG_HOME/cachefs/config.toml`:

    default = "team"
    [remotes.team]
    url = "s3://datasets/cachefs?endpoint_url=https://rgw.example:7480"

The remote named `local` always exists: the embedded default repository under
`$XDG_DATA_HOME/cachefs/repo`. Credentials are never stored here (see docs/design.md).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cachefs.errors import AlreadyExists, ConfigError, NotFound
from cachefs.names import check_name
from cachefs.remotes.base import server_of

LOCAL_REMOTE = "local"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "cachefs"


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "cachefs"


def state_dir() -> Path:
    """Per-machine state that can be lost without losing data (commit scan indexes)."""
    return _xdg("XDG_STATE_HOME", ".local/state") / "cachefs"


def local_repo_url() -> str:
    return "file://" + str((data_dir() / "repo").absolute())


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _describe_url(url: str) -> str:
    """What a message may say of a URL: scheme://host[:port] (user info, path and query can
    hold secrets)."""
    parsed = urlparse(url)
    return server_of(url) if parsed.hostname else f"{parsed.scheme}://..."


@dataclass(frozen=True)
class Config:
    """The named remotes and the default one."""

    remotes: dict[str, str] = field(default_factory=dict)
    default: str | None = None

    @property
    def default_remote(self) -> str:
        return self.default or LOCAL_REMOTE

    def all_remotes(self) -> dict[str, str]:
        return {LOCAL_REMOTE: local_repo_url(), **self.remotes}

    def url_of(self, name_or_url: str) -> str:
        if "://" in name_or_url:
            return name_or_url
        remotes = self.all_remotes()
        if name_or_url not in remotes:
            known = ", ".join(sorted(remotes))
            raise NotFound(f"no remote named {name_or_url!r} (configured: {known})")
        return remotes[name_or_url]

    def remote_for_volume(self, value: str, *, allow_urls: bool) -> tuple[str | None, str]:
        """The (configured name, URL) a CSI volume's `remote` may reach: the driver's trust rule.

        A volume is written by whoever may create pods or PersistentVolumes, but its mount
        carries this node's credentials (CACHEFS_TOKEN, S3/OSS keys): an arbitrary URL would hand
        them to whatever server it names. So a volume names a configured remote by name; a URL
        is accepted if it equals a configured remote's URL (volumes made before names were
        recorded keep working), and any other URL only where `allow_urls` (the cluster admin's
        --allow-remote-urls, never for inline volumes); then the name is None. Anything else
        is a ConfigError (INVALID_ARGUMENT) naming the configured remotes, never the URL's
        credentials.
        """
        remotes = self.all_remotes()
        known = ", ".join(sorted(remotes))
        if "://" not in value:
            if value not in remotes:
                raise ConfigError(f"no remote named {value!r} is configured on this node "
                                  f"(configured: {known})")
            return value, remotes[value]
        named = sorted(name for name, url in remotes.items() if url == value)
        if named:
            return named[0], value
        if allow_urls:
            return None, value
        raise ConfigError(
            f"remote {_describe_url(value)} is not a configured remote: a volume names a "
            f"configured remote ({known}); a URL only where the CSI plugin and mounter run "
            "with --allow-remote-urls, and never in an inline ephemeral volume")

    def with_remote(self, name: str, url: str, make_default: bool) -> Config:
        check_name(name, "remote name")
        if name == LOCAL_REMOTE or name in self.remotes:
            raise AlreadyExists(f"remote {name!r} already exists; remove it first")
        if "://" not in url:
            raise ConfigError(f"invalid remote URL {url!r}: expected SCHEME://...")
        return Config({**self.remotes, name: url}, name if make_default else self.default)

    def without_remote(self, name: str) -> Config:
        if name == LOCAL_REMOTE:
            raise ConfigError("the built-in remote 'local' cannot be removed")
        if name not in self.remotes:
            raise NotFound(f"no remote named {name!r}")
        remotes = {k: v for k, v in self.remotes.items() if k != name}
        return Config(remotes, None if self.default == name else self.default)

    @classmethod
    def load(cls, path: Path | None = None) -> Config:
        path = path or config_dir() / "config.toml"
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            return cls()
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        remotes = {}
        for name, table in data.get("remotes", {}).items():
            if not isinstance(table, dict) or not isinstance(table.get("url"), str):
                raise ConfigError(f"{path}: remote {name!r} needs a url string")
            remotes[name] = table["url"]
        default = data.get("default")
        if default is not None and default != LOCAL_REMOTE and default not in remotes:
            raise ConfigError(f"{path}: default remote {default!r} is not configured")
        return cls(remotes, default)

    def save(self, path: Path | None = None) -> None:
        path = path or config_dir() / "config.toml"
        lines = ["# cachefs configuration (see `cachefs remote --help`)"]
        if self.default:
            lines.append(f"default = {_toml_string(self.default)}")
        for name, url in sorted(self.remotes.items()):
            lines += ["", f"[remotes.{name}]", f"url = {_toml_string(url)}"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
