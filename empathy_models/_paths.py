"""
Where empathy-models keeps its files: `empathy_home` (``$EMPATHY_HOME``, default
``~/.empathy``), resolved at call time, and `make_private_dirs`, which creates a
directory and its missing parents, each 0700.  `quoted_path` and `unquoted_path` put a
file's path in a URL (``sqlite:///...``, SQLite's ``file:`` URIs) and take it out again,
byte for byte: a name that is not valid UTF-8 (a Latin-1 directory) included.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, unquote

from .exceptions import ConfigurationError

__all__ = ["empathy_home", "make_private_dirs", "quoted_path", "unquoted_path"]


def quoted_path(path: str | os.PathLike[str]) -> str:
    """
    ``path`` percent-encoded for a URL, from the bytes the file system names it by: a
    name that is not valid UTF-8 (which Python holds with surrogates, ``caf\\udce9``)
    becomes ``caf%E9`` where ``quote`` would raise `UnicodeEncodeError`.
    """
    return quote(os.fsencode(path))


def unquoted_path(text: str) -> str:
    """The path `quoted_path` encoded (``%E9`` -> the byte 0xE9 in the file's name)."""
    return unquote(text, errors="surrogateescape")


def empathy_home() -> Path:
    """
    The directory empathy-models keeps its files in, resolved now.

    ``$EMPATHY_HOME`` when set and non-empty (``~`` expanded), else ``~/.empathy``.
    The directory is not created here.

    Raises:
        ConfigurationError: ``$EMPATHY_HOME`` is a relative path (it would name another
            directory in every working directory), or names a home directory that does
            not exist (an unknown ``~user``).
    """
    configured = os.environ.get("EMPATHY_HOME", "").strip()
    try:
        if configured:
            home = Path(configured).expanduser()
            if not home.is_absolute():
                raise ConfigurationError(
                    f"EMPATHY_HOME={configured!r} is a relative path: set EMPATHY_HOME to a "
                    "full path"
                )
            return home
        return Path.home() / ".empathy"
    except RuntimeError:  # no home directory for that user (or for this one)
        raise ConfigurationError(
            f"cannot find the home directory for EMPATHY_HOME={configured!r}: set "
            "EMPATHY_HOME to a full path"
            if configured
            else "cannot find a home directory for ~/.empathy: set EMPATHY_HOME to a full path"
        ) from None


def make_private_dirs(directory: Path) -> None:
    """
    Create ``directory`` and each of its missing parents, every one of them mode 0700
    (``Path.mkdir(mode=..., parents=True)`` gives the mode to the last only, the
    parents getting what the umask leaves of 0777).  A directory that exists is left
    as it is; `OSError` when one cannot be made.
    """
    missing = []
    path = directory
    while not path.is_dir() and path.parent != path:
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile (by another process), or not a directory
            if not path.is_dir():
                raise
