"""`.cachefsignore`: gitignore-syntax patterns naming what a commit leaves out.

The file sits at the top of the committed directory and uses git's rules (pathspec's
GitIgnoreSpec implements them): `*.tmp`, `build/` (directories only), `/top-level-only`,
`**/cache/`, `!negation`, `#` comments. As in git, a file inside an ignored directory cannot be
re-included, because the directory is not entered at all. The ignore file itself is committed
unless it ignores itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pathspec

from cachefs.errors import LocalIOError

log = logging.getLogger("cachefs.ignore")

IGNORE_FILE = ".cachefsignore"


class IgnoreRules:
    """The patterns of one `.cachefsignore`; paths are relative to its directory, '/'-separated."""

    def __init__(self, lines: list[str]) -> None:
        self._spec = pathspec.GitIgnoreSpec.from_lines(lines)
        self.patterns = sum(1 for line in lines if line.strip() and not line.startswith("#"))

    @classmethod
    def load(cls, root: Path) -> IgnoreRules | None:
        """The rules in `root/.cachefsignore`, or None when there is no such file."""
        path = root / IGNORE_FILE
        try:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise LocalIOError(f"cannot read {path}: {e.strerror}") from e
        rules = cls(text.splitlines())
        log.info("%s: %d patterns", path, rules.patterns)
        return rules

    def ignores(self, rel_path: str, is_dir: bool) -> bool:
        return self._spec.match_file(rel_path + "/" if is_dir else rel_path)
