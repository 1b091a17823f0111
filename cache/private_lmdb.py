"""Opening an LMDB environment that only the service's user can read."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb


def open_private(path: Path, *, map_size: int, max_dbs: int, sync: bool = True, metasync: bool = True,
                 max_readers: int = 126) -> lmdb.Environment:
    """Open (creating it if needed) the environment in folder ``path``: folder 0700, files 0600, reader slots of
    dead processes freed. Several processes may open the same folder."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    env = lmdb.open(str(path), map_size=map_size, subdir=True, lock=True, sync=sync, metasync=metasync, mode=0o600,
                    max_dbs=max_dbs, max_readers=max_readers)
    try:
        # LMDB sets the mode only on files it creates; older files may be wider.
        for name in ("data.mdb", "lock.mdb"):
            os.chmod(path / name, 0o600)
        env.reader_check()
    except BaseException:
        env.close()
        raise
    return env
