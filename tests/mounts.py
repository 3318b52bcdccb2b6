"""Real storage faults for tests: a read-only bind mount and a small tmpfs (they need mount rights).

`Mounts(tmp_path)` makes them under a test's folder and unmounts them at `close()`; a test that gets
no mount rights (an unprivileged CI runner) is skipped, not faked.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest


class Mounts:
    def __init__(self, root: Path):
        self.root = root
        self.mounted: list[Path] = []

    def _mount(self, *args: str, target: Path) -> None:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
        if done.returncode:
            self.close()
            pytest.skip(f"no mount rights here: {done.stderr.strip()}")
        if target not in self.mounted:
            self.mounted.append(target)

    def read_only(self, *folders: str) -> Path:
        """A folder on a read-only bind mount holding empty `folders` (writes fail with EROFS, also as root)."""
        source, target = self.root / "ro-source", self.root / "ro"
        for folder in folders:
            (source / folder).mkdir(parents=True)
        source.mkdir(exist_ok=True)
        target.mkdir()
        self._mount("--bind", str(source), str(target), target=target)
        self._mount("-o", "remount,bind,ro", str(target), target=target)
        return target

    def small_disk(self, size: str = "1m") -> Path:
        """An empty tmpfs of `size` (fill it with `fill`: writes then fail with ENOSPC)."""
        target = self.root / "disk"
        target.mkdir()
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target), target=target)
        return target

    def make_read_only(self, target: Path) -> None:
        """Remount a bind mount made by `read_only` (or a tmpfs) read-only, as a failing disk does."""
        self._mount("-o", "remount,ro", str(target), target=target)

    def close(self) -> None:
        for target in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        self.mounted.clear()


def fill(disk: Path) -> None:
    """Write a file on `disk` until the disk is full (the real ENOSPC)."""
    block = b"\0" * 65536
    with open(disk / "filler", "wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
                break
    for size in (4096, 512, 1):  # the last partial pages too
        with open(disk / f"filler-{size}", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    assert os.statvfs(disk).f_bavail == 0
