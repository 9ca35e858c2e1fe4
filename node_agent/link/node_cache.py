"""The node cache: verified artifact blobs by content, `<cache>/blobs/sha256/<hex>`, shared by
agent restarts, Pod replacements and the agents of one node (the cache lives on the node's disk,
a hostPath or a systemd unit's state folder), garbage-collected to a size budget.

Invariants:
- a blob's name is its sha256: a file under `blobs/sha256/` holds exactly the bytes of its name
  (`put` writes a temp file `.<hex>.*.tmp` in the same folder, fsyncs it and renames it; a
  process killed before the rename leaves only the temp file, removed at the next `open`), and
  `place` hashes a blob before it hands it out (a blob rotted on disk is dropped, not served);
- `model.yaml` beside a blob (`meta/sha256/<hex>.yaml`) is the config the blob was last
  served with: the signature an offline node needs to serve it again (it is not covered by
  the digest, as the one fetched beside an artifact is not);
- GC (`choose_evictions`, pure) evicts least recently used first and never a blob in use:
  one an assigned model version names, or one a version folder still links (evicting it would
  free no bytes). Last use is the blob's mtime (`place` and `put` touch it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from node_agent.link.durable import fsync_dir, write_atomic

log = logging.getLogger(__name__)

_HEX = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_BYTES = 1 << 20
DEFAULT_BUDGET_BYTES = 10 * 2**30
"""10 GiB: a handful of vision models and a small LLM on a Jetson's 64 GB eMMC or an SSD."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One blob as GC sees it."""

    digest: str
    """'sha256:<hex>'."""
    size_bytes: int
    last_used_s: float
    """Epoch seconds of the last `put` or `place` (the blob's mtime)."""
    links: int = 1
    """Hard links to the blob's inode: > 1 means a version folder holds it too."""


def choose_evictions(blobs: Iterable[BlobInfo], budget_bytes: int, in_use: set[str]) -> list[str]:
    """The digests to evict so the blobs fit `budget_bytes`: least recently used first (ties: the
    larger first, then by digest, so the choice is deterministic), skipping every blob in
    `in_use` or linked from a version folder (`links > 1`). When the blobs that may go are not
    enough, all of them go and the rest stays over budget (a value, not an error)."""
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    blobs = list(blobs)
    total = sum(b.size_bytes for b in blobs)
    chosen: list[str] = []
    candidates = sorted(
        (b for b in blobs if b.digest not in in_use and b.links <= 1),
        key=lambda b: (b.last_used_s, -b.size_bytes, b.digest),
    )
    for blob in candidates:
        if total <= budget_bytes:
            break
        chosen.append(blob.digest)
        total -= blob.size_bytes
    return chosen


def hex_of(digest: str) -> str:
    """The hex part of 'sha256:<hex>'; `ValueError` for anything else."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not _HEX.match(hexpart):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hexpart


class NodeCache:
    """Blobs by digest under `root`. Blocking file work (the link runs it on its thread pool).

    `in_use` names the digests GC must keep (the link passes its assignment's); `budget_bytes`
    bounds the blobs (0: keep none that may go)."""

    def __init__(
        self,
        root: Path,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        in_use: Callable[[], set[str]] = set,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self._in_use = in_use
        self._clock = clock
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.meta_dir = self.root / "meta" / "sha256"

    def open(self) -> list[Path]:
        """Create the folders and remove temp files a killed writer left; returns what it removed."""
        removed: list[Path] = []
        for folder in (self.blobs_dir, self.meta_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for tmp in folder.glob(".*.tmp"):
                with suppress(FileNotFoundError):
                    tmp.unlink()
                    removed.append(tmp)
        return removed

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / hex_of(digest)

    def meta_path(self, digest: str, config_digest: str | None = None) -> Path:
        """The model.yaml kept with blob `digest`; with `config_digest` (the spec's digest of the
        model.yaml a download was verified against), one per config digest: a version is placed
        from the cache only with a model.yaml derived from the one its spec names."""
        suffix = f".{hex_of(config_digest)}" if config_digest else ""
        return self.meta_dir / f"{hex_of(digest)}{suffix}.yaml"

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def config_text(self, digest: str, config_digest: str | None = None) -> str | None:
        """The model.yaml last stored with the blob (for `config_digest`), or None."""
        try:
            return self.meta_path(digest, config_digest).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def put(
        self, source: Path, digest: str, config_text: str | None = None, config_digest: str | None = None
    ) -> None:
        """Store the file `source`, whose bytes the caller has verified to be `digest`, and the
        model.yaml it serves with. A hard link where `source` is on the cache's filesystem (no
        bytes copied); else a copy hashed as it is written, refused (`ValueError`) if it does
        not match. Then GC to the budget."""
        target = self.blob_path(digest)
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        if not target.is_file():  # one already there has these bytes (its name is their digest)
            self._store(source, target, digest)
        self._touch(target)
        if config_text is not None:
            write_atomic(self.meta_path(digest, config_digest), config_text)
        self.collect()

    def place(self, digest: str, target: Path) -> bool:
        """Make `target` hold the blob `digest` (hard link, else a copy), atomically; whether it
        did (False: not in the cache, or the blob no longer matches its name and was dropped).
        A `target` that already is the blob is kept."""
        blob = self.blob_path(digest)
        if not blob.is_file():
            return False
        if _hash(blob) != digest:
            log.warning("node cache: blob %s does not match its digest; dropping it", blob)
            self._drop(digest)
            return False
        if not (target.is_file() and _same_file(blob, target)):
            self._store(blob, target, digest)
        self._touch(blob)
        return True

    def usage(self) -> list[BlobInfo]:
        """Every blob, as GC sees it."""
        out: list[BlobInfo] = []
        if not self.blobs_dir.is_dir():
            return out
        for path in self.blobs_dir.iterdir():
            if not _HEX.match(path.name):
                continue
            with suppress(FileNotFoundError):
                st = path.stat()
                out.append(BlobInfo(f"sha256:{path.name}", st.st_size, st.st_mtime, st.st_nlink))
        return out

    def collect(self) -> list[str]:
        """Evict what `choose_evictions` says; returns the evicted digests."""
        evicted = choose_evictions(self.usage(), self.budget_bytes, self._in_use())
        for digest in evicted:
            self._drop(digest)
            log.info("node cache: evicted %s", digest)
        return evicted

    def _drop(self, digest: str) -> None:
        self.blob_path(digest).unlink(missing_ok=True)
        for meta in self.meta_dir.glob(f"{hex_of(digest)}*.yaml"):
            meta.unlink(missing_ok=True)

    def _touch(self, blob: Path) -> None:
        now = self._clock()
        with suppress(OSError):
            os.utime(blob, (now, now))

    @staticmethod
    def _store(source: Path, target: Path, digest: str) -> None:
        """`source`'s bytes under `target`, through a temp name in the target's folder: a hard
        link where the filesystem allows, else a copy verified against `digest`."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"  # link/"xb" refuse an existing one
        try:
            try:
                os.link(source, tmp)
            except OSError:  # another filesystem (EXDEV), or links not allowed: copy
                _copy_verified(source, tmp, digest)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)


def _copy_verified(source: Path, tmp: Path, digest: str) -> None:
    h = hashlib.sha256()
    with source.open("rb") as src, open(tmp, "xb") as out:
        while chunk := src.read(_CHUNK_BYTES):
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if "sha256:" + h.hexdigest() != digest:
        raise ValueError(f"{source} does not have digest {digest}; not cached")
    with suppress(OSError):
        shutil.copymode(source, tmp)


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
