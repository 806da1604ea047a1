"""User files: opened only when they are regular files; outputs that would overwrite an input are refused.

``open()`` on a named pipe blocks until a writer appears (forever, for a hostile input), and a device such as
``/dev/zero`` never ends: both are refused from ``stat`` before anything reads them. Names longer than the file
system allows (255 bytes on ext4) are a one-line error, not an ``OSError 36`` traceback.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePath, PurePosixPath

from lora_moe_core.errors import UserError

_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))  # fmt: skip


def os_reason(exc: OSError) -> str:
    """A short reason for a failed file-system call, naming over-long file names with the limit."""
    if exc.errno == errno.ENAMETOOLONG:
        return "file name too long (at most 255 bytes per name on this file system)"
    return exc.strerror or str(exc)


def check_regular_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` when it is a regular file (symlinks followed); else a one-line UserError naming it.

    Raises:
        UserError: missing, a folder, a named pipe/device/socket, or a name the file system refuses.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        reason = os_reason(exc) if isinstance(exc, OSError) else str(exc)
        raise UserError(f"cannot read {what} {_short(path)}: {reason}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise UserError(f"{what} {path} is {kind}, not a regular file (reading it could block forever)")
    return path


@contextlib.contextmanager
def _open_regular(path: str | os.PathLike[str], what: str) -> Iterator[tuple[Path, object]]:
    """A regular file opened for reading: non-blocking at open and checked again on the descriptor, so a file
    swapped for a FIFO after :func:`check_regular_file` still cannot block the reader."""
    path = check_regular_file(path, what)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise UserError(f"cannot read {what} {_short(path)}: {os_reason(exc)}") from None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise UserError(f"{what} {path} is not a regular file (reading it could block forever)")
        os.set_blocking(descriptor, True)
        yield path, handle


def read_regular_bytes(path: str | os.PathLike[str], what: str = "file") -> bytes:
    """The bytes of a regular file (never a FIFO's reader: :func:`_open_regular`)."""
    with _open_regular(path, what) as (_, handle):
        return handle.read()


def file_sha256(path: str | os.PathLike[str], what: str = "file") -> str:
    """The SHA-256 (hex) of a regular file, read in chunks (a surgical recording can be gigabytes), never a FIFO's
    reader (:func:`_open_regular`)."""
    with _open_regular(path, what) as (path, handle):
        try:
            return hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as exc:
            raise UserError(f"cannot read {what} {_short(path)}: {os_reason(exc)}") from None


def check_output_name(path: str | os.PathLike[str], what: str = "output") -> None:
    """Refuse an output whose file name the file system cannot hold, before any work is done."""
    name = Path(path).name
    if len(os.fsencode(name)) > 255 - len(".tmp") - 12:  # room for the temp name an atomic write uses
        raise UserError(f"{what} {_short(Path(path))}: file name too long ({len(os.fsencode(name))} bytes; "
                        "at most 239 bytes per name)")  # fmt: skip


def check_output_folder(folder: str | os.PathLike[str], what: str = "output folder") -> Path:
    """``folder`` when files can be created in it (or in its nearest existing parent, where it will be made),
    checked before any work: a regular file in its place, a missing permission, a read-only mount or an
    immutable folder are one line now rather than a traceback (or a lost hour) at the first write.

    The check creates and removes one empty hidden file, because ``os.access`` answers yes to root on an
    immutable (``chattr +i``) folder and says nothing of a quota. Nothing is left behind.

    Raises:
        UserError: naming ``folder`` and why files cannot be written there.
    """
    folder = Path(folder)
    existing = folder.absolute()
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "it is" if existing == folder.absolute() else f"{_short(existing)} is"
        raise UserError(f"{what} {_short(folder)}: {where} a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".lora-moe-write-check-")
    except OSError as exc:
        raise UserError(f"{what} {_short(folder)}: cannot write in {_short(existing)}: {os_reason(exc)}") from None
    os.close(handle)
    os.unlink(probe)
    return folder


@contextlib.contextmanager
def removed_on_failure(folder: str | os.PathLike[str], keep_files: bool = False) -> Iterator[Path]:
    """Create ``folder`` (and missing parents) for a command's outputs; when the block raises, remove the folders
    this call created, so that a failed command leaves nothing behind. A folder that existed is left as it was.

    ``keep_files``: remove the created folders only while they hold no file (a latent cache keeps the entries it
    published before the failure, so that a rerun resumes from them).

    Raises:
        UserError: when the folder cannot be created or written (:func:`check_output_folder`).
    """
    folder = check_output_folder(folder, "cannot create")
    top = folder.absolute()
    while not top.parent.exists() and top.parent != top:
        top = top.parent  # the highest folder that this call creates
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {_short(folder)}: {os_reason(exc)}") from None
    try:
        yield folder
    except BaseException:
        if created and not keep_files:
            shutil.rmtree(top, ignore_errors=True)
        elif created:
            _remove_empty(folder.absolute(), top)
        raise


def _remove_empty(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to ``top`` where they hold nothing but empty folders."""
    if any(path.is_file() or path.is_symlink() for path in folder.rglob("*")):
        return
    shutil.rmtree(folder, ignore_errors=True)
    while folder != top:
        folder = folder.parent
        with contextlib.suppress(OSError):  # not empty: something else lives there
            folder.rmdir()


def _short(path: Path) -> str:
    """A path fit for a one-line message: an over-long name keeps its first and last characters."""
    text = str(path)
    return text if len(text) <= 160 else f"{text[:80]}...{text[-60:]}"


def _resolved(path: str | os.PathLike[str]) -> Path | None:
    text = os.fspath(path)
    if text.startswith("s3://"):
        return None
    try:
        return Path(text).resolve()
    except (OSError, ValueError, RuntimeError):
        return None


def _same(output: PurePath, source: PurePath) -> bool:
    if output == source:
        return True
    if not isinstance(output, Path) or not isinstance(source, Path):
        return False
    try:  # hard links and bind mounts: the same inode under another name
        return output.exists() and source.exists() and os.path.samefile(output, source)
    except OSError:
        return False


def _local(paths: Iterable[str | os.PathLike[str] | None]) -> list[tuple[str, PurePath]]:
    """``(as given, resolved)`` for ``paths`` (None and empty skipped); an ``s3://`` URI as a pure path of its
    bucket and key, so that a prefix and the objects under it compare as folders and files do."""
    found: list[tuple[str, PurePath]] = []
    for raw in paths:
        text = os.fspath(raw) if raw else ""
        if text.startswith("s3://"):
            found.append((text, PurePosixPath("/s3", text[len("s3://") :].strip("/"))))
        elif text and (path := _resolved(text)) is not None:
            found.append((text, path))
    return found


def refuse_clobber(outputs: Iterable[str | os.PathLike[str]], inputs: Iterable[str | os.PathLike[str] | None],
                   command: str, *, output_folders: Iterable[str | os.PathLike[str] | None] = (),
                   input_folders: Iterable[str | os.PathLike[str] | None] = ()) -> None:  # fmt: skip
    """Refuse a run whose outputs would overwrite, replace or sit among its inputs; every input of the command,
    model files and folders included, is named here. Paths are resolved (symlinks) and hard links compared.

    Args:
        outputs: the files a command will write.
        inputs: the files the command reads (None entries and ``s3://`` URIs are skipped).
        command: the command's name for the message, e.g. ``infer``.
        output_folders: folders the command writes into or replaces: none may be, hold, or lie inside an input.
        input_folders: folders read as a whole (a diffusers model folder, a latent cache): no output may be one
            or lie inside one.

    Raises:
        UserError: naming the output and the input it would destroy.
    """
    files, folders = _local(inputs), _local(input_folders)
    for output, target in _local(outputs):
        for raw, source in files:
            if _same(target, source):
                raise UserError(f"{command}: output {output} would overwrite the input {raw}; write elsewhere")
        for raw, source in folders:
            if target.is_relative_to(source) or _same(target, source):
                raise UserError(f"{command}: output {output} lies inside the input folder {raw}; write elsewhere")
    for output, target in _local(output_folders):
        for raw, source in [*files, *folders]:
            if source.is_relative_to(target) or _same(target, source):
                raise UserError(f"{command}: output folder {output} holds the input {raw}; write elsewhere")
        for raw, source in folders:
            if target.is_relative_to(source):
                raise UserError(f"{command}: output folder {output} lies inside the input folder {raw}; write "
                                "elsewhere")  # fmt: skip
