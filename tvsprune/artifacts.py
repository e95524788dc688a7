"""Writing artifacts safely and describing them: atomic writes, hashes, versions."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator


def home() -> Path:
    """The per-user folder tvsprune keeps its own state in (``$TVSPRUNE_HOME``, default ~/.cache/tvsprune)."""
    return Path(os.environ.get("TVSPRUNE_HOME") or Path.home() / ".cache" / "tvsprune")


TMP_SUFFIX = ".tvsprune-tmp"  # marks the temporary files this tool writes: clean-up removes only those


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A failed stage therefore never leaves a half-written artifact behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts follow the umask like any file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as e:
        if isinstance(e, OSError) or "safetensor" in type(e).__name__.lower():
            from .errors import TvsError

            reason = getattr(e, "strerror", None) or str(e)
            raise TvsError(f"cannot write {path}: {reason}") from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_paths(paths: list[str | os.PathLike]) -> Iterator[list[Path]]:
    """Temporary paths beside each of ``paths``, renamed onto them together once every one is
    written: a failure (disk full, Ctrl-C) leaves each target as it was, an earlier artifact whole."""
    targets = [Path(p) for p in paths]
    stack = contextlib.ExitStack()
    with stack:
        tmps = [stack.enter_context(_temporary_beside(t)) for t in targets]
        yield tmps
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target)


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """An empty temporary file beside ``path`` (umask permissions), removed on exit if still there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def removed_on_failure(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield ``folder``; when the block fails, remove the files (and now-empty folders) it created
    there, so a failed stage leaves the folder as it found it."""
    folder = Path(folder)
    existed = folder.exists()
    before = {p for p in folder.rglob("*")} if existed else set()
    try:
        yield folder
    except BaseException:
        if folder.exists():
            new = sorted((p for p in folder.rglob("*") if p not in before), key=lambda p: len(p.parts), reverse=True)
            for p in new:
                if p.is_dir() and not p.is_symlink():
                    with contextlib.suppress(OSError):
                        p.rmdir()
                else:
                    p.unlink(missing_ok=True)
            if not existed:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, kind: str = "file") -> Iterator[None]:
    """Hold an exclusive lock on the output ``path`` (a ``file`` or a ``dir``) for a command's duration.

    A second tvsprune process writing the same output is refused at once with a one-line
    error instead of interleaving its files with the first one's. The lock is an ``flock``
    on a file in the user's own folder (:func:`home`), named by the output's real path
    (nothing is created beside the output; the kernel releases it when the process dies,
    even by SIGKILL). Also refuses an output that exists as the wrong kind (a file where a
    directory is written, or the reverse).
    """
    from .errors import TvsError

    path = Path(path).resolve()  # the real path: a symlinked spelling of the same output gets the same lock
    if kind == "dir" and path.exists() and not path.is_dir():
        raise TvsError(f"output directory {path} exists and is not a directory")
    if kind == "file" and path.is_dir():
        raise TvsError(f"output file {path} exists and is a directory")
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    folder = home() / "locks"  # per user: another user's lock folder can neither block nor see this one
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = folder / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TvsError(f"{path} is being written by another tvsprune process; wait for it to finish "
                           "or choose another output") from None
        yield
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


CONTENT_HASH_BYTES = 4 << 30  # data up to this size is hashed by content; beyond, by name, size and mtime


def content_digest(path: str | os.PathLike | None) -> str | None:
    """What a data folder (or file) holds: sha256 over every file's relative path and bytes, so a
    file replaced under the same name (even with its size and mtime kept) changes it. Beyond
    CONTENT_HASH_BYTES of data, over paths, sizes and modification times instead (logged).
    None when the path does not exist."""
    if path is None:
        return None
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        return None
    stats = [(f.relative_to(root).as_posix() if f != root else f.name, f.stat()) for f in files]
    if sum(st.st_size for _, st in stats) > CONTENT_HASH_BYTES:
        logging.getLogger(__name__).info("%s holds over %d GiB: compared by file names, sizes and mtimes",
                                         root, CONTENT_HASH_BYTES >> 30)
        digest = "stat:" + sha256_json([[n, st.st_size, st.st_mtime_ns] for n, st in stats])
    else:
        h = hashlib.sha256()
        for (name, _), f in zip(stats, files):
            h.update(f"{name}\0".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\n")
        digest = h.hexdigest()
    return digest


def sha256_json(obj: Any) -> str:
    """Hex sha256 of a canonical JSON encoding (stable across runs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact's contents."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("tvsprune", "torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu",
                 "onnx-graphsurgeon", "torch-pruning", "tensorrt", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def read_safetensors(path: str | os.PathLike, what: str, expected_format: str | tuple[str, ...],
                     tensors: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tvsprune metadata, tensors) of a safetensors file written by tvsprune; no pickle.

    Raises a one-line :class:`TvsError` naming ``path`` when it is missing, unreadable,
    or not a ``what`` of ``expected_format``.
    """
    import json

    from safetensors import safe_open

    from .errors import TvsError

    path = Path(path)
    if not path.is_file():
        raise TvsError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("tvsprune")
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:
        raise TvsError(f"{path} is not a readable safetensors file: {e}") from None
    if raw is None:
        raise TvsError(f"{path} has no 'tvsprune' metadata: not a tvsprune {what}")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise TvsError(f"{path}: its 'tvsprune' metadata is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(meta, dict):
        raise TvsError(f"{path}: its 'tvsprune' metadata is not a JSON object")
    accepted = (expected_format,) if isinstance(expected_format, str) else tuple(expected_format)
    if meta.get("format") not in accepted:
        raise TvsError(f"{path}: not a tvsprune {what} (format {meta.get('format')!r}, expected "
                       f"{' or '.join(accepted)})")
    return meta, data
