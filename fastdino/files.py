"""Files written whole or not at all, and one writer per folder, for every part of fastdino (engine and pipelines
alike)."""
import errno
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def atomic_write(path, write) -> Path:
    """Call `write(tmp_path)`, then rename tmp_path onto `path`: readers never see a half-written file, and a failed
    write leaves no temporary file behind. The file gets the mode a plain `open` would (0666 less the umask;
    safetensors alone writes 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_problem(path, *, folder: bool = False) -> str | None:
    """Why `path` cannot be written as fastdino writes it, or None: a file (replaced by `atomic_write` or appended
    to) must be a file this process may write, a folder (`folder`) one it may create and delete entries in. A path
    that does not exist yet is fine (its parent folder decides). No side effect: os.access sees read-only mounts
    and immutable files too (even for root)."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if folder != path.is_dir():
        return f"{path} is a {'file' if folder else 'folder'}; the run writes a {'folder' if folder else 'file'} there"
    if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
        return f"{path} is not writable (read-only, immutable, or another user's)"
    return None


def remove_stale_tmp_files(folder) -> None:
    """Delete the temporary files of `atomic_write` calls whose process is gone (killed mid-write)."""
    for tmp in Path(folder).glob(".*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if tmp.is_file() and pid.isdigit() and not _process_exists(int(pid)):
            logger.info("removing %s, left by a process killed while writing it", tmp)
            tmp.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


LOCK_FILE = ".fastdino.lock"


class FolderLockError(ValueError):
    """The folder's lock is held by another live process, or cannot be taken."""


class FolderLock:
    """One writer per folder: an exclusive POSIX record lock (fcntl) on FOLDER/.fastdino.lock, held from `acquire`
    to `release`. The OS drops it when the holder dies, however it dies, so a lock file left behind never blocks;
    the file itself stays (deleting it would let two processes lock two different files). fcntl locks, unlike
    flock, work across the nodes of NFS and are not inherited by forked workers, which may outlive a killed run.
    The holder writes its PID and host into the file, for the message of whoever is refused."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise FolderLockError naming the holder (or why the lock file cannot be opened)."""
        import fcntl
        import socket

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise FolderLockError(f"cannot open the lock file {self.path}: {error.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise FolderLockError(f"{self.path.parent} is in use by another fastdino process ({self._holder()}); "
                                   f"wait for it to end, or write into another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def _holder(self) -> str:
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
        except OSError:
            pid = host = ""
        return f"PID {pid} on {host}" if pid.isdigit() else "PID unknown"

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *_):
        self.release()
