"""Tokens handed to luksctl as operators hand them: in a file only its owner can read."""

from __future__ import annotations

import os
from pathlib import Path


def write_secret_file(path: Path, secret: str) -> str:
    """`secret` and a newline in a new file created 0600, so no one else can read it even for a
    moment (a write, then a chmod, leaves it readable in between). A file already there is replaced."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as stream:
        stream.write(secret + "\n")
    return str(path)
