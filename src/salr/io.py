"""Files that appear complete or not at all, survive a power loss once written, and are shared like any other file.

- Atomic: every output is written under a temporary name beside its target and renamed into place.
- Durable: the data is fsynced before the rename and the directory after it.
- Permissions: temporary files and directories get the modes a plain `open()` / `mkdir()` would give under the
  process umask (mkstemp / mkdtemp create 0600 / 0700, which would make a shared model directory unreadable).
- Leftovers: temporary names carry the writer's PID (`.NAME.PID.RANDOM.tmp`, `.NAME.old-PID`), so a later run can
  remove the ones whose writer is dead (`remove_stale_temps`) without touching a concurrent writer's.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from salr.errors import SALRError

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
_OLD_RE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")


def umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def make_temp_dir(parent: Path, name: str) -> Path:
    """A new empty directory `parent/.NAME.PID.RANDOM.tmp` with the umask's permissions."""
    path = Path(tempfile.mkdtemp(prefix=temp_prefix(name), suffix=".tmp", dir=parent))
    os.chmod(path, 0o777 & ~umask())
    return path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries: renames and creations inside it)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync a directory; the data itself was synced
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then the directories (deepest first)."""
    dirs = []
    for root, _, files in os.walk(path):
        dirs.append(Path(root))
        for f in files:
            fsync_path(Path(root) / f)
    for d in reversed(dirs):
        fsync_path(d)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def check_output_dir(
    out: str | os.PathLike, marker: str, what: str = "output", entries: set[str] | None = None
) -> Path:
    """Before any work: `out` can be written (see check_writable_dir) and is absent, empty or holds `marker` (an
    earlier output of the same kind, which `write_dir` may replace) and, when `entries` names everything this kind
    of output holds, nothing else. Returns the absolute path."""
    path = check_writable_dir(out, what)
    if path.is_dir() and any(path.iterdir()):
        if not (path / marker).exists():
            raise SALRError(
                f"{what} {path} exists and is not an earlier {what} (no {marker}): choose a new or empty directory"
            )
        if entries is not None:
            refuse_foreign_entries(path, entries | {marker}, what)
    return path


def refuse_foreign_entries(path: Path, entries: set[str], what: str) -> None:
    """Replacing `path` would delete what it holds beyond `entries` (the names salr wrote there): refuse instead."""
    foreign = sorted(p.name for p in path.iterdir() if p.name not in entries)
    if foreign:
        names = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise SALRError(
            f"{what} {path} holds {names}, which salr did not write there; replacing it would delete them: "
            "choose a new or empty directory, or move them out"
        )


def swap_dir(new: Path, target: Path) -> None:
    """Rename directory `new` to `target`, durably; an existing `target` is moved aside first and removed only after
    the new one is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        fsync_path(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
        fsync_path(target.parent)


def write_dir(out: str | os.PathLike, fill: Callable[[Path], None], marker: str, what: str = "output") -> Path:
    """Build directory `out` atomically: `fill(tmp)` writes into a temporary sibling, which is fsynced and renamed to
    `out`. An existing `out` is replaced only when it is empty, or holds `marker` (a file or directory that this kind
    of output always has) and nothing the new output does not replace; it is removed only after the new one is in
    place."""
    out = check_output_dir(out, marker, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, {out.name})
    tmp = make_temp_dir(out.parent, out.name)
    try:
        fill(tmp)
        if out.is_dir():  # nothing of the earlier output's directory may go that the new one does not replace
            refuse_foreign_entries(out, {p.name for p in tmp.iterdir()}, what)
        fsync_tree(tmp)
        swap_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _finite(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(_finite(v) for v in obj)
    return True


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """JSON text of `obj`; NaN and infinities are refused (they are not JSON and break other readers)."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as err:
        if _finite(obj):
            raise
        raise SALRError(f"refusing to write a report with non-finite numbers (NaN or infinity): {err}") from err


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically; NaN / infinity raise SALRError (a strict JSON file or none)."""
    atomic_write_bytes(path, (json_dumps(obj, indent=2, sort_keys=False) + "\n").encode())


MAX_JSON_BYTES = 256 << 20


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of regular file `path`, refusing more than `limit` or more than its reported size (a special file
    such as /proc/self/pagemap reports 0 and never ends)."""
    size = path.stat().st_size
    if size > limit:
        raise SALRError(f"{path} is {size:,} bytes, more than {limit:,}: not the file salr expects")
    with path.open("rb") as f:
        data = f.read(size + 1)
    if len(data) > size:
        raise SALRError(f"{path} is larger than its reported size (not a regular file?): refusing to read it")
    return data


def read_json(path: str | os.PathLike, what: str = "", limit: int = MAX_JSON_BYTES) -> Any:
    """Parsed JSON of `path`; any unreadable, binary, malformed or absurdly nested file is a one-line SALRError."""
    path = Path(path)
    label = f"{path}" + (f" ({what})" if what else "")
    try:
        if not path.exists():
            raise FileNotFoundError(path)
        if not path.is_file():
            raise SALRError(f"{label} is not a regular file")
        return json.loads(read_bounded(path, limit).decode("utf-8"))
    except FileNotFoundError as err:
        raise SALRError(f"{label} is missing") from err
    except UnicodeDecodeError as err:
        raise SALRError(f"{label} is corrupt: not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise SALRError(f"{label} is corrupt: not valid JSON (line {err.lineno}: {err.msg})") from err
    except RecursionError as err:
        raise SALRError(f"{label} is corrupt: nested too deeply to be read") from err
    except OSError as err:
        raise SALRError(f"{label} cannot be read ({err.strerror or err})") from err


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike, names: set[str] | None = None) -> list[Path]:
    """Remove `.NAME.PID.*.tmp` and `.NAME.old-PID` entries of `directory` whose process is gone (a killed save);
    only those for NAME in `names` when given. Returns what was removed."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _TEMP_RE.match(entry.name) or _OLD_RE.match(entry.name)
        if match is None or (names is not None and match.group("name") not in names):
            continue
        if _alive(int(match.group("pid"))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Fail now, not after hours of work, when directory output `path` cannot be created or replaced there.

    Returns the absolute, normalised path (so '.' and 'x/..' have a name and a parent)."""
    path = Path(os.path.abspath(path))
    if path.parent == path:
        raise SALRError(f"{what} {path} is the file system root: pass a directory to create")
    if path.exists() and not path.is_dir():
        raise SALRError(f"{what} {path} exists and is not a directory: pass a directory")
    _check_parent_writable(path, what)
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise SALRError(f"{what} {path}: no permission to write in it")
    return path


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Fail now when file output `path` cannot be written (a directory, a missing or read-only parent)."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise SALRError(f"{what} {path} is a directory: pass a file name")
    _check_parent_writable(path, what)
    return path


def _check_parent_writable(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` is a directory this process may create entries in."""
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SALRError(f"{what} {path}: {existing} is a file, so the directory cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SALRError(f"{what} {path}: no permission to write in {existing}")
