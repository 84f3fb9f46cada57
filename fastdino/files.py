"""Files written whole or not at all, for every part of fastdino (engine and pipelines alike)."""
import os
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call `write(tmp_path)`, then rename tmp_path onto `path`: readers never see a half-written file, and a failed
    write leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
