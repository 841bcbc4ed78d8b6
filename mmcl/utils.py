"""Small shared helpers: atomic file writes, seeding, logging."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger("mmcl")


class UserError(ValueError):
    """Bad input from the user (a file, a flag, a config): the CLI prints the one-line message, no traceback."""


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync and rename it over `path`.

    A crash leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600 whatever the umask; open() would not
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself is durable only once the directory entry is on disk
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (setting it is process-wide, racy
    with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def _device_of(path: Path) -> str:
    """The device (or filesystem) holding `path`, with its mount point: "/dev/sda1 (mounted at /data)"."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    mount = path
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        with open("/proc/self/mounts") as f:
            devices = {fields[1]: fields[0] for fields in (line.split() for line in f) if len(fields) > 1}
    except OSError:
        devices = {}
    device = devices.get(str(mount))
    return f"{device} (mounted at {mount})" if device and device != str(mount) else str(mount)


@contextlib.contextmanager
def disk_errors(folder: str | Path, needed: Callable[[], int | None] | int | None = None) -> Iterator[None]:
    """Turn a full disk or an unwritable folder met while writing into `folder` into a one-line UserError.

        with disk_errors(out_dir, needed=lambda: bytes_still_to_write):
            ...write files under out_dir...

    "no space left on /dev/sdb1 (mounted at /data) writing /data/run: 3 MB free, needed ~310 MB" or
    "output folder /data/run is not writable (Read-only file system)". torch's writer reports a full disk as a
    RuntimeError ("file write failed"): that is recognised by the free space left. Clean up temporaries in
    the block itself (`atomic_open` does for its file); this only words the error.

    Args:
        folder: the output folder written to.
        needed: bytes the job still had to write (an estimate, or a function giving one at the time of the
            error), said in the message; None: not said.
    """
    folder = Path(folder)
    try:
        yield
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise UserError(_no_space(folder, needed)) from None
        if e.errno in _NOT_WRITABLE:
            where = f" ({e.filename})" if e.filename and Path(str(e.filename)) != folder else ""
            raise UserError(f"output folder {folder} is not writable: {e.strerror}{where}") from None
        raise
    except RuntimeError as e:  # torch.save's PytorchStreamWriter: "... file write failed"
        if "write failed" in str(e) or "enforce fail" in str(e):
            with contextlib.suppress(OSError):
                if shutil.disk_usage(_existing(folder)).free < 16 * 2**20:
                    raise UserError(_no_space(folder, needed)) from None
        raise


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _no_space(folder: Path, needed: Callable[[], int | None] | int | None) -> str:
    try:
        amount = needed() if callable(needed) else needed
    except Exception:  # an estimate must never hide the real error
        amount = None
    try:
        free = f"{shutil.disk_usage(_existing(folder)).free / 2**20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    want = f", needed ~{max(1, round(amount / 2**20))} MB" if amount else ""
    return f"no space left on {_device_of(folder)} writing {folder}: {free}{want}; free some space or choose another folder"


def fsync_path(path: str | Path) -> None:
    """Flush a file's data to the disk (what a rename of it must wait for, or a power loss can empty it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (renames, new files) to the disk, as databases do; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


class FolderLock:
    """An exclusive `flock` on a lock file in a folder, held until `release()` or this process ends.

    The kernel drops the lock when its holder dies, however it dies: a lock file left by a killed run never
    blocks the next one. The file keeps who took the lock last (pid, host, time), for the message of whoever
    is refused.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def lock_folder(folder: str | Path, name: str | None, what: str, wait: bool = False) -> FolderLock:
    """Take `folder/name` exclusively for `what` (e.g. "training"), or say who holds it.

    Args:
        name: the lock file, which keeps its holder's pid, host and time; None locks the folder itself and adds
            no file to it (a folder whose layout is a format, e.g. shards), but cannot say who holds it.
        wait: when another process holds it, log who and wait for it, instead of refusing.

    Raises:
        UserError: another process holds it (and not `wait`): one line with its pid, host and start time.
    """
    import json
    import socket
    import time

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name if name else folder
    if name:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    else:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        import fcntl
    except ImportError:  # Windows: no flock; run without a lock
        return FolderLock(path, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}") if name else {}
        except ValueError:
            holder = {}
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"])) if "time" in holder else "?"
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since} (lock {path})" if name else ""
        if not wait:
            os.close(fd)
            raise UserError(
                f"{folder} is in use by another {what}: {who}; wait for it to end or choose another folder"
            ) from None
        log.info("%s: waiting for another %s to finish%s", folder, what, f": {who}" if who else "")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
    except OSError as e:  # a filesystem without flock (some network mounts): go on unlocked
        log.warning("%s: cannot lock it (%s); make sure no other %s uses it at the same time", folder, e, what)
    except BaseException:
        os.close(fd)
        raise
    if not name:
        return FolderLock(path, fd)
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    return FolderLock(path, fd)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def loader_worker_init(worker_id: int, parent_pid: int | None = None) -> None:
    """A DataLoader `worker_init_fn`: the worker dies with its parent and keeps off the parent's W&B run.

    Use it as `functools.partial(loader_worker_init, parent_pid=os.getpid())`, bound in the parent.

    * A worker outlives a SIGKILLed or SIGTERMed parent for good (PPID 1, its memory held): torch's own
      watchdog only looks while the worker waits for work, and the worker then hangs at exit flushing its
      result queue to nobody. On Linux the kernel sends the worker SIGKILL when the parent dies
      (prctl PR_SET_PDEATHSIG); elsewhere, and as a fallback, a daemon thread exits once the parent is gone.
    * Ctrl-C reaches the whole process group: the worker ignores it and leaves stopping to the parent (which
      shuts its workers down), instead of dying mid-hand-over with a traceback.
    * A worker forked after `wandb.init` inherits W&B's import hooks: its first import of a module W&B watches
      (open_clip, transformers ... loaded lazily by the data pipeline) publishes telemetry through the parent's
      connection and raises wandb's ForkedError. Telemetry is the parent's business: the hooks are dropped here.

    Args:
        worker_id: given by the DataLoader (unused).
        parent_pid: the process that started the loader; default: this worker's parent now.
    """
    parent = parent_pid if parent_pid is not None else os.getppid()
    hooks = sys.modules.get("wandb.sdk.lib.import_hooks")
    if hooks is not None:
        hooks.unregister_all_post_import_hooks()
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="mmcl-parent-watch", daemon=True).start()


def _exit_with_parent(parent: int, interval_s: float = 1.0) -> None:
    import time

    while os.getppid() == parent:
        time.sleep(interval_s)
    os._exit(1)  # reparented: the parent is gone, and so is anyone reading this worker's results


class _LogProgress:
    """tqdm's counting interface, written as a plain log line every `every_s` seconds (for logs in files)."""

    def __init__(self, total: int | None, desc: str, unit: str, every_s: float) -> None:
        import time

        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n, self._clock = 0, time.monotonic
        self._start = self._last = self._clock()
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._clock() - self._last >= self.every_s:
            self._line()

    def set_postfix(self, **values: object) -> None:
        self._postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def _line(self) -> None:
        self._last = self._clock()
        rate = self.n / max(self._last - self._start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        log.info("%s: %d%s %s (%.1f %s/s)%s", self.desc, self.n, of, self.unit, rate, self.unit,
                 f" {self._postfix}" if self._postfix else "")  # fmt: skip

    def close(self) -> None:
        pass  # the job's own summary line follows; a short job gets no progress line at all

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, every_s: float = 30.0):
    """A tqdm bar on a terminal; when stderr is not one (a log file: SLURM, CI, nohup), a plain log line every
    `every_s` seconds instead of a bar's carriage returns. Disabled: a tqdm that shows nothing.

    Returns:
        An object with tqdm's `update(n)`, `set_postfix(**kw)` and `close()`.
    """
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return _LogProgress(total, desc, unit, every_s)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def setup_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s mmcl %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
