"""Files appear whole or not at all: write to a temporary name beside the target, then rename.

The one home of atomic writing, used by the core (``Registration.save``), ``io``, the
report and the CLI, and of JSON that stays valid (``json_safe``: no NaN); it imports
nothing of the package.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(obj):
    """``obj`` with NaN and Inf floats as None (valid JSON); dicts, lists and tuples are walked,
    arrays and tensors (anything with ``tolist``) become lists or numbers first."""
    import math

    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def file_record(path) -> dict:
    """What identifies an input file's content: its absolute path, size and SHA-256."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}
