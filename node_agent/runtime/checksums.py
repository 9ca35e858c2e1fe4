"""`SHA256SUMS` manifests: a multi-file artifact (a Hugging Face checkpoint folder) pinned by one
digest, the manifest's own, which lists every file's sha256 (`sha256sum` format, `<hex>  <path>`).
The repository and the link verify the manifest by its digest and each file by its line. Pure
apart from reading files; no torch."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from node_agent.errors import DigestMismatch, InvalidModel
from node_agent.runtime.repository import sha256_file

CHECKSUMS_FILE = "SHA256SUMS"
"""The artifact of a `huggingface` version: checksums of every checkpoint file."""


def parse_checksums(text: str) -> list[tuple[str, str]]:
    """(`sha256:<hex>`, relative POSIX path) per line; `InvalidModel` for a malformed line or a
    path that is absolute or leaves the folder."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel or any(c not in "0123456789abcdef" for c in digest):
            raise InvalidModel(f"{CHECKSUMS_FILE} line {n}: expected '<sha256 hex>  <path>'")
        path = PurePosixPath(rel)
        if path.is_absolute() or ".." in path.parts or rel.startswith("./"):
            raise InvalidModel(f"{CHECKSUMS_FILE} line {n}: {rel!r} is outside the checkpoint")
        out.append(("sha256:" + digest, path.as_posix()))
    return out


def write_checksums(directory: Path | str) -> Path:
    """Write `SHA256SUMS` for every regular file under `directory` (except model.yaml and
    itself and hidden files), sorted by path; returns its path."""
    directory = Path(directory)
    lines = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel in (CHECKSUMS_FILE, "model.yaml") or rel.startswith(".") or "/." in rel:
            continue
        lines.append(f"{sha256_file(path).removeprefix('sha256:')}  {rel}\n")
    target = directory / CHECKSUMS_FILE
    target.write_text("".join(lines), encoding="utf-8")
    return target


def verify_checksums(manifest: Path) -> None:
    """Check every file `manifest` lists; `DigestMismatch` for a changed or missing file,
    `InvalidModel` for a malformed manifest or a path that leaves its directory."""
    root = manifest.parent.resolve()
    for digest, rel in parse_checksums(manifest.read_text(encoding="utf-8")):
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise InvalidModel(f"{CHECKSUMS_FILE}: {rel!r} is outside the checkpoint")
        if not path.is_file():
            raise DigestMismatch(f"checkpoint file {rel!r} is missing")
        if sha256_file(path) != digest:
            raise DigestMismatch(f"checkpoint file {rel!r} does not match {CHECKSUMS_FILE}")
