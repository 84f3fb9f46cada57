"""Files written whole or not at all, for every part of fastdino (engine and pipelines alike)."""
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
