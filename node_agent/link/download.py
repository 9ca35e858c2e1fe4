"""Downloads that respect an edge link: `Delivery.fetch` brings one content-addressed artifact
(its sha256 known in advance) into its target file, from the node's peers first, then from the
origin.

Invariants:
- bytes arrive in `<target>.part` beside the target and are hashed as they are written; the
  part is renamed to the target only once its sha256 is the digest asked for: nothing
  unverified ever has the target's name;
- a transfer cut part way resumes where it stopped with an HTTP Range request (`If-Range`
  with the ETag when the source that wrote the part gave one). Only a 206 whose Content-Range
  starts at the part's size is appended; a 200 (the server ignored Range, or its ETag
  changed) starts the part over. The part survives an agent restart (`remove_temp_files`
  removes `.*.tmp` only); its hash is then rebuilt from its bytes;
- a peer (another agent of the site, `GET /edgefleet/v1/artifacts/sha256/<hex>`) is tried
  once: one that fails, is slower than `peer_min_bytes_per_s`, or serves bytes that do not
  verify is left for the next source, the origin last. Bytes a failed peer wrote are kept
  and resumed from (content addressing: they are the same bytes wherever they come from);
  if the whole does not verify, a part that was resumed is discarded and fetched once more
  from the origin from its first byte;
- the origin is retried `RetryPolicy.attempts` times at most and within `total_s`, with
  exponential backoff and jitter; 4xx answers other than 408/429 are not retried;
- a fetch that knows the artifact's size (`size_bytes`, from a registry manifest) reads no
  source past it: a source that sends more fails (the origin permanently) with the part
  holding no more than that many bytes;
- every byte read from the origin passes the node's `TokenBucket` (one per agent, shared by
  its downloads), so the node stays under its bandwidth limit on the uplink; bytes from site
  peers (the LAN) are not paced.

Blocking (urllib): runs on the link's thread pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet_api.backoff import Backoff
from edgefleet_api.edge_node import seed_rank
from node_agent import __version__
from node_agent.errors import DigestMismatch, InvalidModel
from node_agent.link.settings import LinkSettings

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
PART_SUFFIX = ".part"
ARTIFACT_ROUTE = "/edgefleet/v1/artifacts/sha256/"
"""Path prefix under which an agent serves the artifacts it holds, by their sha256 hex."""
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


# --- policy -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long a download from the origin is retried. Times in seconds."""

    attempts: int = 3
    """Transfers from the origin at most (the first one included). Few: the part file stays,
    and the link retries a failed version (`retry_failed_s`), resuming it; more here would
    only delay the Failed status that tells the operator the origin is out of reach."""
    initial_s: float = 1.0
    max_s: float = 30.0
    """Delay after the n-th failure: initial_s * 2**(n-1), at most max_s, drawn from [d/2, d]
    so a site whose link came back does not retry in step."""
    total_s: float = 900.0
    """No retry starts after this long since the download began (15 min: a 200 MB model over
    a 2 Mbit/s link takes about 14)."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1, got {self.attempts}")
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("retry delays need 0 < initial_s <= max_s")
        if not self.total_s > 0:
            raise ValueError("retry total_s must be > 0")


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How this node downloads artifacts."""

    bandwidth_bytes_per_s: int = 0
    """The node's limit on bytes per second from origins (the uplink), all downloads
    together; 0: none. Peer transfers (the site's LAN) are not counted."""
    burst_bytes: int = 1 << 20
    """Bytes that may pass at once after an idle spell (the token bucket's depth)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    read_timeout_s: float = 30.0
    """Per read from the origin (not the whole transfer: artifacts may be large)."""
    peer_timeout_s: float = 5.0
    """Per read from a peer: a peer is on the site's LAN, a stall means it is gone."""
    peer_min_bytes_per_s: int = 256 * 1024
    """A peer slower than this (time spent reading, pacing excluded) past `peer_grace_s` is
    left for the next source: the origin may well be faster. 0: never."""
    peer_grace_s: float = 2.0
    peer_wait_s: float = 300.0
    """How long a node that is not its site's seeder for an artifact (`Delivery.is_seeder`)
    waits, polling its peers, for one of them to hold it before it goes to the origin."""

    @classmethod
    def of(cls, link: LinkSettings) -> DeliverySettings:
        """The delivery part of the agent's link settings (flags, EDGEFLEET_LINK_DOWNLOAD_*)."""
        return cls(
            bandwidth_bytes_per_s=link.download_bandwidth_bytes_per_s,
            retry=RetryPolicy(
                attempts=link.download_attempts,
                initial_s=link.download_backoff_initial_s,
                max_s=link.download_backoff_max_s,
                total_s=link.download_total_s,
            ),
            peer_wait_s=link.download_peer_wait_s,
        )

    def __post_init__(self) -> None:
        if self.bandwidth_bytes_per_s < 0 or self.peer_min_bytes_per_s < 0:
            raise ValueError("bandwidth limits must be >= 0")
        if self.burst_bytes < 1:
            raise ValueError("burst_bytes must be >= 1")
        if not (
            self.read_timeout_s > 0 and self.peer_timeout_s > 0 and self.peer_grace_s >= 0 <= self.peer_wait_s
        ):
            raise ValueError("timeouts must be > 0")


class TokenBucket:
    """Pacing of a byte stream at `rate_bytes_per_s`, with bursts up to `burst_bytes`. Pure
    (times are passed in) and thread-safe. Invariant: the bytes admitted by time t (`take`,
    each then waiting what it returned) are at most burst + rate * (t - first call)."""

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int) -> None:
        if not rate_bytes_per_s > 0 or burst_bytes < 1:
            raise ValueError("need rate_bytes_per_s > 0 and burst_bytes >= 1")
        self.rate_bytes_per_s, self.burst_bytes = float(rate_bytes_per_s), burst_bytes
        self._tokens = float(burst_bytes)
        self._last_s: float | None = None
        self._lock = threading.Lock()

    def take(self, n_bytes: int, now_s: float) -> float:
        """Account `n_bytes` passing at `now_s`; the seconds the caller must wait before it
        passes more (0 while the bucket holds tokens). A debt is paid by waiting, so callers
        sharing the bucket wait in turn."""
        with self._lock:
            if self._last_s is not None and now_s > self._last_s:
                elapsed = now_s - self._last_s
                self._tokens = min(float(self.burst_bytes), self._tokens + elapsed * self.rate_bytes_per_s)
            if self._last_s is None or now_s > self._last_s:
                self._last_s = now_s
            self._tokens -= n_bytes
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_bytes_per_s


# --- the download -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    url: str
    peer: bool = False
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclass(slots=True)
class FetchReport:
    """What one `fetch` did: bytes received per source URL, bytes thrown away (a restart, a
    source whose bytes did not verify), and the offsets transfers resumed from."""

    bytes_by_source: dict[str, int] = field(default_factory=dict)
    discarded_bytes: int = 0
    resumed_from: list[int] = field(default_factory=list)
    origin_attempts: int = 0
    rejected_peers: list[str] = field(default_factory=list)

    @property
    def received_bytes(self) -> int:
        return sum(self.bytes_by_source.values())


class SourceFailed(Exception):
    """One transfer from one source failed; `permanent`: retrying it will not help; `status`:
    the HTTP status that said so (None: no answer, or a cut)."""

    def __init__(self, message: str, permanent: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.permanent, self.status = permanent, status


class _Part:
    """`<target>.part`: its bytes and their running sha256 always agree."""

    def __init__(self, path: Path, limit_bytes: int | None = None) -> None:
        self.path = path
        self.limit_bytes = limit_bytes
        """The most bytes it may hold (None: no limit)."""
        self.hasher = hashlib.sha256()
        self.size = 0
        self.validator: tuple[str, str] | None = None
        """(source URL, ETag) of the response that wrote the bytes, for If-Range."""
        if path.is_file():
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    self.hasher.update(chunk)
                    self.size += len(chunk)

    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()

    def reset(self) -> int:
        """Empty it; the bytes it held."""
        dropped, self.size = self.size, 0
        self.hasher, self.validator = hashlib.sha256(), None
        self.path.write_bytes(b"")
        return dropped


def part_path(target: Path) -> Path:
    return target.with_name(target.name + PART_SUFFIX)


def peer_url(base: str, digest: str) -> str:
    """Where peer `base` (an agent's base URL) serves the artifact with `digest` ('sha256:<hex>')."""
    return base.rstrip("/") + ARTIFACT_ROUTE + digest.removeprefix("sha256:")


class Delivery:
    """The node's downloader: one per agent (its token bucket is the node's bandwidth limit).
    `peers`: base URLs of agents of this site that may hold an artifact (set by the link from
    its EdgeNode spec); `peer_headers`: sent to them (e.g. the fleet's bearer token);
    `self_url`: this agent's own base URL as its peers know it (picks the site's seeder)."""

    def __init__(
        self,
        settings: DeliverySettings | None = None,
        *,
        peers: Sequence[str] = (),
        peer_headers: Mapping[str, str] | None = None,
        self_url: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or DeliverySettings()
        self.peers: tuple[str, ...] = tuple(peers)
        self.peer_headers = dict(peer_headers or {})
        self.self_url = self_url
        self.bucket = (
            TokenBucket(self.settings.bandwidth_bytes_per_s, self.settings.burst_bytes)
            if self.settings.bandwidth_bytes_per_s
            else None
        )
        self._clock, self._rng = clock, rng or random.Random()
        self._given_sleep = sleep
        self._stopping = threading.Event()

    def stop(self) -> None:
        """End every download at its next wait or chunk (an agent stopping must not wait out a
        backoff): each raises `InvalidModel`, its part kept to resume."""
        self._stopping.set()

    def _sleep(self, delay_s: float) -> None:
        if self._given_sleep is time.sleep:
            self._stopping.wait(delay_s)
        else:
            self._given_sleep(delay_s)
        if self._stopping.is_set():
            raise InvalidModel("the agent is stopping; the download resumes at its next start")

    def is_seeder(self) -> bool:
        """Whether this node fetches from the origin at once rather than wait for a peer to
        hold an artifact: its URL ranks first (`edge_node.seed_rank`) among itself and its
        peers. The operator gives every other node of the site the seed among its peers, so
        a site has one; without its own URL or peers a node never waits."""
        if not self.self_url or not self.peers:
            return True
        return min((*self.peers, self.self_url), key=seed_rank) == self.self_url

    def fetch(
        self,
        url: str,
        target: Path,
        digest: str,
        label: str = "",
        headers: Mapping[str, str] | None = None,
        size_bytes: int | None = None,
    ) -> FetchReport:
        """`target` holds the bytes with sha256 `digest` on return (fetched from a peer or
        `url`, with `headers`, e.g. a registry's token). `size_bytes`: the length the bytes
        must have (a registry manifest declares it); no source is read past it. Raises
        `DigestMismatch` (the origin's bytes are not the digest's), `InvalidModel` (no source
        could deliver them, or the origin sent more than `size_bytes`), OSError."""
        label = label or target.name
        target.parent.mkdir(parents=True, exist_ok=True)
        part = _Part(part_path(target), size_bytes)
        report = FetchReport()
        if size_bytes is not None and part.size > size_bytes:
            report.discarded_bytes += part.reset()
        if part.size and part.digest() == digest:
            self._finish(part, target)
            return report
        origin = Source(url, False, dict(headers or {}))
        if self._from_peers(digest, part, report, label) or self._from_origin(
            origin, digest, part, report, label
        ):
            self._finish(part, target)
            log.info("stored %s (%s)", target, _summary(report))
            return report
        raise AssertionError("unreachable: the origin either delivers or raises")

    def _from_peers(self, digest: str, part: _Part, report: FetchReport, label: str) -> bool:
        """Try each peer once, and again while some answer 404 (not held yet: the site's
        seeder is fetching it) for up to `peer_wait_s`; whether `part` now verifies."""
        s = self.settings
        if not self.peers:
            return False
        wait_until_s = self._clock() + (0.0 if self.is_seeder() else s.peer_wait_s)
        delay_s = s.retry.initial_s
        failed: set[str] = set()
        while True:
            not_held = False
            for base in self.peers:
                source = Source(peer_url(base, digest), True, self.peer_headers)
                if source.url in failed:
                    continue
                try:
                    self._transfer(source, part, report)
                except SourceFailed as e:
                    if e.status == 404:
                        not_held = True
                    else:
                        failed.add(source.url)
                        log.info("%s: peer %s failed (%s); next source", label, source.url, e)
                    continue
                if part.digest() == digest:
                    return True
                report.discarded_bytes += part.reset()
                report.rejected_peers.append(source.url)
                failed.add(source.url)
                log.warning("%s: peer %s served bytes that do not verify; next source", label, source.url)
            if not not_held or self._clock() + delay_s > wait_until_s:
                return False
            self._sleep(delay_s)
            delay_s = min(delay_s * 2, s.retry.max_s)

    def _from_origin(self, source: Source, digest: str, part: _Part, report: FetchReport, label: str) -> bool:
        url = source.url
        retry = self.settings.retry
        deadline_s = self._clock() + retry.total_s
        backoff = Backoff(retry.initial_s, retry.max_s, self._rng)
        fresh_retried = False
        while True:
            resumed = part.size > 0
            try:
                self._transfer(source, part, report)
            except SourceFailed as e:
                if e.permanent or report.origin_attempts >= retry.attempts:
                    raise InvalidModel(f"{label}: fetching {url} failed: {e}") from None
                delay_s = backoff.next()
                if self._clock() + delay_s > deadline_s:
                    raise InvalidModel(f"{label}: fetching {url} failed: {e} (retries out of time)") from None
                log.warning("%s: fetching %s: %s; retrying in %.1f s", label, url, e, delay_s)
                self._sleep(delay_s)
                continue
            actual = part.digest()
            if actual == digest:
                return True
            report.discarded_bytes += part.reset()
            if resumed and not fresh_retried:
                fresh_retried = True  # the bytes resumed from (a peer's, an older file's) may be wrong
                continue
            part.path.unlink(missing_ok=True)
            raise DigestMismatch(
                f"{label}: artifact {url} has digest {actual}, but the EdgeNode spec requires "
                f"{digest}; refusing to load it"
            )

    # -- one transfer ------------------------------------------------------------------------

    def _transfer(self, source: Source, part: _Part, report: FetchReport) -> None:
        """Append what `source` sends to `part` (resuming at its size); SourceFailed on a
        failure, with the bytes received so far kept in the part."""
        s = self.settings
        headers = {"User-Agent": f"edgefleet-agent/{__version__}", **source.headers}
        if part.size:
            headers["Range"] = f"bytes={part.size}-"
            if part.validator is not None and part.validator[0] == source.url:
                headers["If-Range"] = part.validator[1]
        if not source.peer:
            report.origin_attempts += 1
        request = urllib.request.Request(source.url, headers=headers)
        timeout_s = s.peer_timeout_s if source.peer else s.read_timeout_s
        try:
            response = urllib.request.urlopen(request, timeout=timeout_s)  # http(s) only: parsed before
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and part.size:  # the part is longer than the artifact: start over
                report.discarded_bytes += part.reset()
                raise SourceFailed("HTTP 416: the partial download is not a prefix of it") from None
            permanent = e.code not in _TRANSIENT_STATUS
            raise SourceFailed(f"HTTP {e.code} {e.reason}", permanent, e.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise SourceFailed(str(getattr(e, "reason", e)) or type(e).__name__) from None
        with response:
            self._check_start(response, part, report)
            etag = response.headers.get("ETag")
            if etag and not etag.startswith("W/"):
                part.validator = (source.url, etag)
            self._stream(response, source, part, report)

    def _check_start(self, response: Any, part: _Part, report: FetchReport) -> None:
        if response.status == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != part.size:
                raise SourceFailed(
                    f"206 with Content-Range {response.headers.get('Content-Range')!r}, "
                    f"asked from {part.size}"
                )
            report.resumed_from.append(part.size)
        elif response.status == 200:
            if part.size:
                log.info(
                    "%s: the server sent it whole (Range ignored or changed); starting over", response.url
                )
                report.discarded_bytes += part.reset()
        else:
            raise SourceFailed(f"unexpected HTTP {response.status}")

    def _stream(self, response: Any, source: Source, part: _Part, report: FetchReport) -> None:
        s = self.settings
        received, reading_s = 0, 0.0
        try:
            with part.path.open("ab") as out:
                try:
                    while True:
                        started_s = self._clock()
                        chunk = response.read(CHUNK_BYTES)
                        reading_s += self._clock() - started_s
                        if not chunk:
                            break
                        if part.limit_bytes is not None and part.size + len(chunk) > part.limit_bytes:
                            raise SourceFailed(f"sent more than the {part.limit_bytes} bytes expected", True)
                        out.write(chunk)
                        part.hasher.update(chunk)
                        part.size += len(chunk)
                        received += len(chunk)
                        report.bytes_by_source[source.url] = report.bytes_by_source.get(source.url, 0) + len(
                            chunk
                        )
                        if self.bucket is not None and not source.peer:
                            wait_s = self.bucket.take(len(chunk), self._clock())
                            if wait_s > 0:
                                self._sleep(wait_s)
                        if (
                            source.peer
                            and s.peer_min_bytes_per_s
                            and reading_s > s.peer_grace_s
                            and received / reading_s < s.peer_min_bytes_per_s
                        ):
                            raise SourceFailed(f"slower than {s.peer_min_bytes_per_s} bytes/s")
                finally:
                    out.flush()
                    os.fsync(out.fileno())
        except (http.client.HTTPException, OSError) as e:  # cut mid-transfer, read timeout
            raise SourceFailed(f"cut after {received} bytes: {type(e).__name__}: {e}") from None
        short = getattr(response, "length", None)
        if isinstance(short, int) and short > 0:
            raise SourceFailed(f"the transfer stopped {short} bytes short")

    def _finish(self, part: _Part, target: Path) -> None:
        os.replace(part.path, target)
        with suppress(OSError):  # not every filesystem lets a folder be fsynced
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def _summary(report: FetchReport) -> str:
    parts = [f"{n} bytes from {url}" for url, n in report.bytes_by_source.items()]
    if report.discarded_bytes:
        parts.append(f"{report.discarded_bytes} discarded")
    return ", ".join(parts) or "already complete"
