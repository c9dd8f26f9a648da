"""Spare inodes: the spool reuses the files and folders it is done with instead of deleting and creating anew.

ext4 without a journal (the benchmark machine's root filesystem) does not hand out an inode freed in the last 60
to 360 seconds: each creation scans past every such inode of its block group. The spool makes and removes five
files or folders per instance. Right after heavy churn a creation cost 0.7 ms of CPU and inode allocation took
13% of all CPU while the node compressed JPEG-LS (perf, system-wide; 0.15% with spares). In calmer runs it took
0.3%, and spares measured neither better nor worse. PostgreSQL recycles its WAL segments (`wal_recycle`) for a
similar reason. A spare is an empty file or folder in tmp/spare/, which the start-up
sweep empties with the rest of tmp/. Claiming one is a rename, so threads and processes can share the pool: a
spare another one took first is simply gone.

Only a file with a single link is given back (truncated first): a name still pointing at it elsewhere, such as
another destination's job, keeps it whole. A claimed file is opened with truncation by whoever writes it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import threading
from pathlib import Path

SPARE_LIMIT = 512
"""Most spares kept of each kind; more are removed. About as many are given back as claimed in steady state."""


class Spares:
    """A pool of empty files and of empty folders under `root`, shared by the processes of one spool."""

    def __init__(self, root: Path, limit: int = SPARE_LIMIT) -> None:
        self._pools = {kind: _Pool(root / kind, limit) for kind in ("files", "folders")}

    def claim_file(self, target: Path) -> bool:
        """Move an empty spare file to `target` (replacing it), its times set to now; False if none is left."""
        if not self._pools["files"].claim(target):
            return False
        os.utime(target)  # the janitor judges abandoned receives by their age
        return True

    def claim_folder(self, target: Path) -> bool:
        """Move an empty spare folder to `target` (which must not exist or be empty); False if none is left."""
        return self._pools["folders"].claim(target)

    def held(self) -> int:
        """How many spares (files and folders) the pool holds now, in every process."""
        return sum(len(pool.listed()) for pool in self._pools.values())

    def give_file(self, path: Path) -> None:
        """Keep a file nobody needs as a spare (emptied) when it has no other link; remove it otherwise."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or not self._pools["files"].has_room():
            path.unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nothing to keep
            self._pools["files"].add(path, empty=True)

    def give_folder(self, path: Path) -> None:
        """Keep an emptied folder as a spare, its files given back first; what is left in it is removed."""
        with os.scandir(path) as entries:
            for entry in list(entries):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    self.give_file(Path(entry.path))
        if self._pools["folders"].has_room():
            self._pools["folders"].add(path)
        else:
            path.rmdir()


class _Pool:
    """Spares of one kind in one folder; which names are there is cached per process and re-read when needed."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        self._names: list[str] = []
        self._estimate = 0
        """How many spares the folder holds, as far as this process knows (others may have claimed some)."""
        self._lock = threading.Lock()

    def claim(self, target: Path) -> bool:
        while True:
            with self._lock:
                if not self._names:
                    self._names = self.listed()
                    self._estimate = len(self._names)
                if not self._names:
                    return False
                name = self._names.pop()
                self._estimate -= 1
            spare = self.folder / name
            try:
                os.replace(spare, target)
            except FileNotFoundError:
                if os.path.lexists(spare):
                    raise  # the target's folder is missing
                continue  # claimed by another thread or process first
            return True

    def has_room(self) -> bool:
        with self._lock:
            if self._estimate >= self.limit:
                self._estimate = len(self.listed())  # others may have claimed some meanwhile
            return self._estimate < self.limit

    def add(self, path: Path, empty: bool = False) -> None:
        """Put `path` in the pool; `empty`: truncate it first, under a name in tmp/ that no claim can see (so a
        crash never leaves a truncated file where its name was, and a claimer never gets one not yet emptied)."""
        name = secrets.token_hex(8)
        with self._lock:
            self._estimate += 1
        if empty:
            staged = self.folder.parent / f"{name}.emptying"
            self._move(path, staged)
            os.truncate(staged, 0)
            path = staged
        self._move(path, self.folder / name)

    def _move(self, path: Path, target: Path) -> None:
        try:
            os.replace(path, target)
        except FileNotFoundError:
            if not os.path.lexists(path):
                raise
            target.parent.mkdir(parents=True, exist_ok=True)  # gone with the start-up sweep: made again
            os.replace(path, target)

    def listed(self) -> list[str]:
        """The names of the spares in the folder now."""
        try:
            return os.listdir(self.folder)
        except FileNotFoundError:
            return []
