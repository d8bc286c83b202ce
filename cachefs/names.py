"""Validation of every user- or store-supplied name, and parsing of DATASET[@REF][:PATH] addresses.

Names are checked where they enter (command line, decoded trees, ref listings), so that nothing
downstream ever builds a path or a key from an unchecked string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cachefs.errors import InvalidName, UsageError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX_RE = re.compile(r"[0-9a-f]+")
HASH_HEX_LEN = 64
MIN_COMMIT_PREFIX = 4


# git's check-ref-format rules, each with the words an InvalidName names it by. Names are one
# component (no '/'): they are one key segment of refs/DATASET/heads/NAME/... and of
# datasets/NAME, and git forbids the same names for the same reasons (ambiguous revision
# syntax, lock files, path tricks), so a name that git refuses is refused here too.
_REF_FORBIDDEN_CHARS = " ~^:?*[\\"


def ref_format_problem(name: str) -> str | None:
    """Which of git's check-ref-format rules `name` breaks (as one component), else None."""
    if not name:
        return "it is empty"
    if name == "@":
        return "it is exactly '@'"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "it contains an ASCII control character"
    bad = sorted({c for c in name if c in _REF_FORBIDDEN_CHARS}, key=_REF_FORBIDDEN_CHARS.index)
    if bad:
        return "it contains " + ", ".join(repr(c) for c in bad)
    if ".." in name:
        return "it contains '..'"
    if "@{" in name:
        return "it contains '@{'"
    if "//" in name:
        return "it contains '//'"
    if name.endswith("/"):
        return "it ends with '/'"
    for part in name.split("/"):
        if part.startswith("."):
            return "a component starts with '.'"
        if part.endswith(".lock"):
            return "a component ends with '.lock'"
    if name.endswith("."):
        return "it ends with '.'"
    return None


def check_name(name: str, what: str = "name", *, existing: bool = False) -> str:
    """Return `name` if it is a valid dataset, remote, branch or tag name, else raise InvalidName.

    A name is 1-128 characters from [A-Za-z0-9._-], starting with a letter or digit, and obeys
    git's check-ref-format rules (so not `a..b`, `x.lock` or `v1.`); the message names the rule
    that is broken. `existing=True` names something that may have been created before the git
    rules applied: only the character rule is checked, so it can still be read, moved or deleted.
    """
    if not isinstance(name, str):
        raise InvalidName(f"invalid {what} {name!r}: not a string")
    problem = None if existing else ref_format_problem(name)
    if problem is not None:
        raise InvalidName(f"invalid {what} {name!r}: {problem} (git's ref-name rules)")
    if not _NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return name


def check_entry_name(name: str) -> str:
    """Return `name` if it can be one directory entry: no '/', no NUL, not '.', '..' or empty."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidName(f"invalid entry name {name!r} in a tree")
    return name


def check_entry_bytes(raw: bytes) -> bytes:
    """`check_entry_name` for a raw (undecoded) name, as trees store it."""
    if not raw or raw in (b".", b"..") or b"/" in raw or b"\0" in raw:
        raise InvalidName(f"invalid entry name {raw!r} in a tree")
    return raw


def check_hash(value: str, what: str = "object name") -> str:
    """Return `value` if it is a full lowercase hex BLAKE3 name."""
    if len(value) != HASH_HEX_LEN or not _HEX_RE.fullmatch(value):
        raise InvalidName(f"invalid {what} {value!r}: expected {HASH_HEX_LEN} hex characters")
    return value


def is_hash_prefix(value: str) -> bool:
    """True if `value` could abbreviate a commit hash (like git, at least 4 hex characters)."""
    return MIN_COMMIT_PREFIX <= len(value) <= HASH_HEX_LEN and bool(_HEX_RE.fullmatch(value))


def split_path(path: str) -> list[str]:
    """Split a path inside a dataset into validated components ('' or '/' is the root)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise InvalidName(f"'..' is not allowed in dataset path {path!r}")
        check_entry_name(part)
    return parts


@dataclass(frozen=True)
class Address:
    """A parsed DATASET[@REF][:PATH] address; `ref` is None when none was given."""

    dataset: str
    ref: str | None
    path: str

    @property
    def ref_or_default(self) -> str:
        return self.ref if self.ref is not None else "main"


def parse_address(text: str, allow_path: bool = True) -> Address:
    """Parse DATASET[@REF][:PATH]; REF is a branch, tag or commit-hash prefix."""
    rest, sep, path = text.partition(":")
    if sep and not allow_path:
        raise UsageError(f"{text!r}: a path (':PATH') is not accepted here")
    dataset, at, ref = rest.partition("@")
    check_name(dataset, "dataset name", existing=True)
    if at and not is_hash_prefix(ref):
        try:
            check_name(ref, "ref", existing=True)
        except InvalidName as e:
            raise InvalidName(f"{e} in {text!r}") from None
    split_path(path)
    return Address(dataset=dataset, ref=ref if at else None, path=path.strip("/"))


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", re.IGNORECASE)
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str) -> int:
    """Parse '4MiB', '512K', '1G', '4194304' into bytes (K, M, G are binary, like dd and du)."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise UsageError(f"invalid size {text!r}: expected a number, optionally K/M/G/T(iB)")
    value = float(m.group(1)) * 1024 ** _UNITS[m.group(2).upper()]
    return int(value)


def format_size(n: float) -> str:
    """Human-readable binary size, e.g. 4.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
