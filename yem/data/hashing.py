"""Content hashes: the identities that caches, manifests and checkpoints are keyed by."""

import hashlib
from pathlib import Path

from yem.errors import DataError


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot read it (got {e.strerror}). Put it back or fix its permissions, "
                        f"then rerun: dvc repro.") from None
    return digest.hexdigest()
