"""Output folders that neuralreg owns: it deletes or replaces only what it wrote.

The contract:

- An output folder is written whole or not at all: into a hidden temporary folder
  ``.<name>.tmp-XXXX`` beside it, then renamed into place.
- Every folder neuralreg writes holds a manifest, ``.neuralreg-manifest.json``, listing the
  files it wrote there. A folder is *ours* when its manifest is readable and every entry
  in it is listed (an empty folder counts as ours too: it holds nothing to lose).
- ``overwrite`` replaces only a folder that is ours, and atomically: the old folder is
  renamed aside, the new one renamed into place, then the old one's listed files are
  removed. A folder holding anything neuralreg did not write is refused, with or without
  ``overwrite``; so are the working directory (or a folder holding it) and a folder
  holding one of the run's inputs.
- One run at a time writes an output folder: ``OutputFolder`` takes an exclusive lock
  (``.<name>.neuralreg-lock`` beside it, removed when released) for the whole run, so a
  second run on the same folder stops at once with a one-line error instead of racing.
- Hidden temporaries and set-aside folders of killed runs (``.<name>.tmp-*``,
  ``.<name>.old-*``) are removed by the next run on that folder, under its lock, and only
  while their manifest says neuralreg wrote them and they hold nothing else
  (``_only_outputs``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from neuralreg.errors import OutputError

MANIFEST = ".neuralreg-manifest.json"
LOCK_SUFFIX = ".neuralreg-lock"


def read_manifest(folder) -> dict | None:
    """The manifest of a folder neuralreg wrote, or None (missing, unreadable or foreign)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "neuralreg" or not isinstance(data.get("files"), list):
        return None
    if not all(_plain_name(name) for name in data["files"]):
        return None  # a name with a path in it is no name neuralreg writes: never follow it out of the folder
    return data


def _plain_name(name) -> bool:
    """A file name without any path: no separator, not '.', '..' or empty."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def foreign_entries(folder) -> list[str]:
    """Names in ``folder`` that neuralreg did not write there (sorted; empty: the folder is ours)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    listed = set(manifest["files"]) if manifest else set()
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and p.name not in listed)


def write_manifest(folder, kind: str, complete: bool = True) -> None:
    """List every file now in ``folder`` as neuralreg's (``kind``: what wrote it)."""
    from neuralreg.version import __version__

    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    data = {"written_by": "neuralreg", "version": __version__, "kind": kind, "complete": complete, "files": files}
    (folder / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")


def describe(names: list[str], quote: bool = True) -> str:
    """The first three names (quoted) and how many more: for one-line messages."""
    shown = ", ".join(repr(n) if quote else n for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_folder(path, overwrite: bool, inputs: Iterable = (), flag: str = "output folder") -> Path:
    """Refuse an output folder that neuralreg may not write (``OutputError``, one line); its path.

    Checked before any work, and again under the lock just before the folder is replaced.
    """
    if str(path) == "":
        raise OutputError(f"{flag} is empty: name a new folder")
    path = Path(path)
    real = Path(os.path.abspath(path)).resolve()
    if _is_within(Path.cwd().resolve(), real):
        raise OutputError(f"{flag} {path} is the working directory or holds it: name a new folder")
    for item in inputs:
        if item is not None and _is_within(Path(os.path.abspath(item)).resolve(), real):
            raise OutputError(f"{flag} {path} holds the input {item}: name a folder outside the inputs")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"{flag} {path} exists and is not a folder")
    if path.exists():
        foreign = foreign_entries(path)
        if foreign:
            raise OutputError(
                f"{flag} {path} holds files neuralreg did not write ({describe(foreign)}); "
                "nothing was touched: name a new folder"
            )
        if not overwrite and any(path.iterdir()):
            raise OutputError(f"{flag} {path} exists; pass --overwrite to replace it")
    _check_parent(path, real, flag)
    return path


def _check_parent(path: Path, real: Path, flag: str) -> None:
    """Refuse an output whose nearest existing ancestor is a file or cannot be written in."""
    parent = _existing_ancestor(real.parent)
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write in {parent} (permission denied)")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


LOCK_MARK = b"neuralreg lock\n"  # written into a lock file as it is created: only such a file is removed


class _Lock:
    """An exclusive, non-blocking lock on ``path``: a file neuralreg creates with ``LOCK_MARK``
    in it, locked with ``flock``, and removed on release only while it still holds the mark
    (a file of the user's that happens to bear the name is locked, never removed)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def _open(self) -> int | None:
        """The lock file, created with its mark where it is missing; None if it vanished meanwhile."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            os.write(fd, LOCK_MARK)
            return fd
        except FileExistsError:
            try:
                return os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                return None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the exclusively created file is the lock
            try:
                self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                return False
            os.write(self.fd, LOCK_MARK)
            return True
        while True:
            fd = self._open()
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            try:  # a holder that released and removed the file in between: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    return True
            except FileNotFoundError:
                pass
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.lseek(self.fd, 0, os.SEEK_SET)
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino and os.read(self.fd, 64) == LOCK_MARK:
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def try_lock(path: Path) -> _Lock | None:
    """The lock of output path ``path`` if no other run holds it, else None."""
    lock = _Lock(path.parent / f".{path.name}{LOCK_SUFFIX}")
    return lock if lock.acquire() else None


def remove_stale(path: Path) -> list[str]:
    """Remove ``.<name>.tmp-*`` and ``.<name>.old-*`` folders that neuralreg wrote beside ``path``.

    Call with ``path``'s lock held: no other run is then writing them. Returns their names.
    """
    removed = []
    for pattern, partial in ((f".{path.name}.tmp-*", True), (f".{path.name}.old-*", False)):
        for p in path.parent.glob(pattern):
            if p.is_dir() and not p.is_symlink() and _only_outputs(p, partial):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".tfm", ".pt", ".json", ".png")


def _only_outputs(folder: Path, partial: bool) -> bool:
    """Whether ``folder`` has neuralreg's manifest and holds nothing but plain files that it
    lists or, in a ``partial`` folder (a temporary one whose run was killed before its
    manifest listed its files), that neuralreg writes: outputs by their suffixes and atomic
    writes' ``.tmp-*`` partials. A set-aside ``.old-*`` folder was a complete folder of
    neuralreg's: everything in it must be listed."""
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    listed = {*manifest["files"], MANIFEST}
    for p in folder.iterdir():
        written = p.name.startswith(".tmp-") or p.name.endswith(OUTPUT_SUFFIXES)
        if not (p.is_file() and not p.is_symlink() and (p.name in listed or (partial and written))):
            return False
    return True


class OutputFolder:
    """One run's hold on its output folder, from the first check to the folder's swap.

    ``with OutputFolder(out, overwrite, inputs) as folder: ... folder.commit(write)``:
    entering checks the folder (``check_output_folder``), locks it against other runs and
    removes stale temporaries; ``commit(write)`` calls ``write(tmp)`` on a fresh hidden
    folder, lists its files in the manifest, and swaps it into place. An error inside
    ``write`` leaves the old folder as it was and removes the temporary one.
    """

    def __init__(self, path, overwrite: bool = False, inputs: Iterable = (), kind: str = "registration"):
        self.overwrite, self.inputs, self.kind = overwrite, tuple(inputs), kind
        self.path = check_output_folder(path, overwrite, self.inputs)
        self._lock: _Lock | None = None
        self._made: list[Path] = []

    def __enter__(self) -> OutputFolder:
        parent = Path(os.path.abspath(self.path)).parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:
                continue
            self._made.append(p)
        self._lock = try_lock(self.path)
        if self._lock is None:
            self._remove_made()
            raise OutputError(f"another neuralreg run is writing {self.path}; wait for it or name another folder")
        remove_stale(self.path)
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if not self.path.exists():
            self._remove_made()

    def _remove_made(self) -> None:
        for p in reversed(self._made):
            with contextlib.suppress(OSError):
                p.rmdir()  # only if still empty
        self._made = []

    def commit(self, write) -> None:
        """Write the folder's files with ``write(tmp)``, then put it in place of ``path``."""
        from neuralreg.files import umask

        if self._lock is None:
            raise RuntimeError("OutputFolder.commit outside its 'with' block")
        path = self.path
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            write_manifest(tmp, self.kind, complete=False)
            write(tmp)
            write_manifest(tmp, self.kind)
            os.chmod(tmp, 0o777 & ~umask())
            check_output_folder(path, self.overwrite, self.inputs)  # nothing foreign arrived meanwhile
            if path.exists():
                old = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except OSError:
                    os.replace(old, path)
                    raise
                _remove_owned(old)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _remove_owned(folder: Path) -> None:
    """Remove the files of a folder neuralreg wrote: those its manifest lists, then the folder if empty."""
    manifest = read_manifest(folder)
    for name in [*(manifest["files"] if manifest else []), MANIFEST]:
        p = folder / name
        if p.is_file() or p.is_symlink():
            with contextlib.suppress(OSError):
                p.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def written_by_neuralreg(path) -> bool:
    """Whether ``path`` is a NIfTI file whose header says neuralreg wrote it (``io.DESCRIP``)."""
    import nibabel as nib

    from neuralreg.io import DESCRIP

    try:
        return bytes(nib.load(str(path)).header["descrip"]).rstrip(b"\0").startswith(DESCRIP)
    except Exception:
        return False


def check_output_file(path, overwrite: bool, inputs: Iterable = (), flag: str = "--out") -> Path:
    """Refuse an output file that neuralreg may not write (``OutputError``, one line); its path.

    An existing file is replaced only with ``overwrite`` and only if neuralreg wrote it;
    an input of the run is never replaced.
    """
    if str(path) == "":
        raise OutputError(f"{flag} is empty: name a new file")
    path = Path(path)
    real = Path(os.path.abspath(path)).resolve()
    for item in inputs:
        if item is not None and Path(os.path.abspath(item)).resolve() == real:
            raise OutputError(f"{flag} {path} is an input of this command: name a new file")
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder: name a file (.nii or .nii.gz)")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputError(f"{flag} {path} exists; pass --overwrite to replace it")
        if path.is_symlink() or not written_by_neuralreg(path):
            raise OutputError(f"{flag} {path} was not written by neuralreg; it is not replaced: name a new file")
    _check_parent(path, real, flag)
    return path


def add_to_manifest(folder, names: Iterable[str], kind: str) -> None:
    """List ``names`` in ``folder``'s manifest as files neuralreg writes there (a folder that
    also holds other things, e.g. a batch's output folder with its summary)."""
    from neuralreg.files import atomic_write
    from neuralreg.version import __version__

    folder = Path(folder)
    manifest = read_manifest(folder) or {"written_by": "neuralreg", "kind": kind, "complete": True, "files": []}
    files = sorted(set(manifest["files"]) | set(names))
    if files == manifest["files"] and (folder / MANIFEST).exists():
        return
    manifest.update(files=files, version=__version__)
    with atomic_write(folder / MANIFEST) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
