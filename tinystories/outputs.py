"""Output paths: checked before any work starts, and named when a write still fails.

Every subcommand that writes (`--out`, `--json`) calls one of the two checks first, so a path that
cannot be written fails in a second with one line instead of after an hour of training, and before
anything is created on disk:

    check_output_file(args.json, "--json")            # a file we will write (its folders may not exist yet)
    check_output_dir(args.out, "--out", sibling=True)  # a folder we will write; sibling=True when it is built
                                                       # as a temporary folder beside it and renamed into place
    with writing(path):                                # an OSError while writing `path` -> one UserError line
        path.write_text(...)

What "cannot be written" means here is what the kernel will answer: the path (or the nearest of its
folders that exists) must be a folder where a folder is wanted and a file where a file is wanted,
and `os.access` must grant write and search permission on the folder we would create entries in.
`os.access` asks with the real uid, the same answer the write would get: a read-only mount is
refused even for root, while a folder without write bits is writable by root, so root is not
refused there (the write would succeed). Nothing is created or probed by writing: the checks only
look. Anything they cannot foresee (a full disk, a file-size limit, a race) is caught by `writing`,
which names the path and the reason.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from tinystories.errors import UserError


def _nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else the closest of its parents that does."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(".")  # unreachable for absolute paths: "/" exists


def _check_ancestors(path: Path, flag: str) -> Path:
    """Refuse a path that lies under a file; return the folder where new entries would be created."""
    anchor = _nearest_existing(path.parent)
    if not anchor.is_dir():  # e.g. `--out notes.txt/x.png`: notes.txt is a file, so no folder can be made under it
        raise UserError(f"{flag} {path}: {anchor} is a file, not a folder")
    return anchor


def _check_writable_folder(folder: Path, flag: str, path: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        where = "" if folder == path else f" ({folder} is not writable)"
        reason = "a read-only file system" if _read_only_mount(folder) else "no write permission"
        raise UserError(f"{flag} {path} cannot be written{where}: {reason}")


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_output_file(path, flag: str) -> Path:
    """Check that the file `path` can be written (created, or replaced if it exists)."""
    text = os.fspath(path)
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if text.endswith(("/", os.sep)):  # Path() drops the slash that says "a folder"
        raise UserError(f"{flag} {text} names a folder; give a file name")
    anchor = _check_ancestors(path, flag)
    if os.path.lexists(path):  # replacing a file: it must be writable itself
        if not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path} cannot be written: no write permission")
        anchor = path.parent
    _check_writable_folder(anchor, flag, path)
    return path


def check_output_dir(path, flag: str, *, sibling: bool = False) -> Path:
    """Check that the folder `path` can be created or written into.

    sibling: the command builds the folder as a temporary sibling and renames it into place (prepare,
    export), so the parent folder must take new entries too, not only `path` itself.
    """
    path = Path(path).expanduser()
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder")
    anchor = _check_ancestors(path, flag)
    if path.is_dir():
        _check_writable_folder(path, flag, path)
        if sibling:
            _check_writable_folder(path.resolve().parent, flag, path)
    else:
        _check_writable_folder(anchor, flag, path)
    return path


def reason(e: OSError) -> str:
    """The operating system's words for an OSError ("No space left on device"), else its text."""
    return e.strerror or str(e) or type(e).__name__


@contextmanager
def writing(path, note: str = ""):
    """Turn an OSError raised while writing `path` into one line: which path, why, and `note`
    (e.g. what was left as it was)."""
    try:
        yield
    except OSError as e:
        raise UserError(f"could not write {path} ({reason(e)})" + (f"; {note}" if note else "")) from None


def write_file(path, data: bytes | str, *, write=None) -> Path:
    """Write `data` (or call `write(tmp_path)`) to a temporary sibling and rename it to `path`.

    So a failed write (a full disk) leaves an earlier `path` as it was, never half a file; the
    folders leading to `path` are made if needed. Failures are one line naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if write is not None:
                write(tmp)
            else:
                tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path
