"""Writing files that several processes share ($TOWLINE_HOME, evaluation run folders)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a reader sees the old file or the new one, never a part.

    The text goes to a unique file beside ``path`` (processes writing at once never share
    one), is flushed to disk, and is renamed into place. The file gets the permissions the
    umask gives, like any file the user creates.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_atomic(folder / "a.json", "{}\\n")
    >>> (folder / "a.json").read_text(), [p.name for p in folder.iterdir()]
    ('{}\\n', ['a.json'])
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")
    try:
        with temp.open("x", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
