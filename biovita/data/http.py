"""Polite HTTP downloads for `biovita fetch` (no Ray here): a per-host schedule (concurrency
cap, request rate, pauses asked for by the server), retries with exponential backoff and full
jitter on what may pass (timeouts, dropped connections, short bodies, 429, 5xx), none on what
will not (403, 404, 410 and other 4xx), and a size limit checked before and while reading.
"""

from __future__ import annotations

import email.utils
import http.client
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from urllib.parse import urlsplit

USER_AGENT = "biovita-fetch/0.1 (research dataset download; polite, rate-limited)"


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float = 30.0  # connect and each read
    max_attempts: int = 4  # requests per URL in one run
    backoff_s: float = 1.0  # first retry waits up to this; doubles per attempt (full jitter)
    backoff_max_s: float = 60.0  # the longest wait, Retry-After included
    max_bytes: int = 100 * 2**20  # larger bodies are rejected ("too_large")
    host_connections: int = 4  # requests in flight per host, across the cluster
    host_rate: float = 5.0  # requests started per second per host, across the cluster

    def __post_init__(self):
        if self.max_attempts < 1 or self.host_connections < 1 or self.host_rate <= 0:
            raise ValueError("max_attempts and host_connections must be >= 1, host_rate > 0")


@dataclass
class Download:
    """One URL's outcome: "ok" (body), "rejected" (will not succeed: not retried on a re-run
    unless asked) or "failed" (may succeed later: retried on a re-run)."""

    url: str
    outcome: str
    reason: str = ""
    body: bytes | None = None
    status: int = 0
    attempts: int = 0

    @property
    def host(self) -> str:
        return host_of(self.url)


def host_of(url: str) -> str:
    return urlsplit(url).netloc.lower()


class HostSchedule:
    """Who may start a request to a host now: at most `max_in_flight` in flight, starts spaced
    1/rate apart, none while the host asked us to pause (Retry-After). Pure bookkeeping; the
    caller supplies the clock and does the waiting (threads here, asyncio in Ray's actor)."""

    def __init__(self, max_in_flight: int, rate: float):
        self.max_in_flight, self.interval = max_in_flight, 1.0 / rate
        self.active: dict[str, int] = defaultdict(int)
        self.next_start: dict[str, float] = defaultdict(float)
        self.paused_until: dict[str, float] = defaultdict(float)

    def try_acquire(self, host: str, now: float) -> float:
        """0 when the caller may start now (its slot is taken), else seconds to wait first."""
        wait = max(self.next_start[host], self.paused_until[host]) - now
        if wait > 0:
            return wait
        if self.active[host] >= self.max_in_flight:
            return 0.02
        self.active[host] += 1
        self.next_start[host] = now + self.interval
        return 0.0

    def release(self, host: str, now: float, pause_s: float = 0.0) -> None:
        self.active[host] = max(0, self.active[host] - 1)
        if pause_s > 0:
            self.paused_until[host] = max(self.paused_until[host], now + pause_s)


class LocalGate:
    """A HostSchedule shared by the threads of one process."""

    def __init__(self, max_in_flight: int, rate: float):
        self.schedule, self.lock = HostSchedule(max_in_flight, rate), threading.Lock()

    def acquire(self, host: str) -> None:
        while True:
            with self.lock:
                wait = self.schedule.try_acquire(host, time.monotonic())
            if wait == 0:
                return
            time.sleep(min(wait, 0.5))

    def release(self, host: str, pause_s: float = 0.0) -> None:
        with self.lock:
            self.schedule.release(host, time.monotonic(), pause_s)


def retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); 0 when absent."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())


def _read(resp, max_bytes: int) -> tuple[bytes | None, str]:
    """The body, or (None, reason): "too_large" (declared or read), "short_body" (the
    connection closed before Content-Length bytes came)."""
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        return None, "too_large"
    chunks, size = [], 0
    while True:
        try:
            chunk = resp.read(1 << 16)
        except http.client.IncompleteRead:
            return None, "short_body"
        if not chunk:
            break
        size += len(chunk)
        if size > max_bytes:
            return None, "too_large"
        chunks.append(chunk)
    body = b"".join(chunks)
    if declared and declared.isdigit() and len(body) != int(declared):
        return None, "short_body"
    return body, ""


def _attempt(url: str, policy: FetchPolicy) -> tuple[str, str, bytes | None, int, float]:
    """One request: (kind, reason, body, status, server-asked pause); kind is "ok", "retry"
    or "reject"."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(req, timeout=policy.timeout_s) as resp:
            body, why = _read(resp, policy.max_bytes)
            if body is None:
                return ("reject" if why == "too_large" else "retry"), why, None, resp.status, 0.0
            return "ok", "", body, resp.status, 0.0
    except urllib.error.HTTPError as e:
        pause = retry_after(e.headers.get("Retry-After")) if e.headers else 0.0
        if e.code == 429 or e.code >= 500:
            return "retry", f"http_{e.code}", None, e.code, pause
        return "reject", f"http_{e.code}", None, e.code, 0.0
    except (TimeoutError, socket.timeout):
        return "retry", "timeout", None, 0, 0.0
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            return "retry", "timeout", None, 0, 0.0
        if isinstance(e.reason, (ValueError,)) or "unknown url type" in str(e.reason):
            return "reject", "bad_url", None, 0, 0.0
        return "retry", "connection_error", None, 0, 0.0
    except ValueError:  # not a URL at all
        return "reject", "bad_url", None, 0, 0.0
    except (ConnectionError, http.client.HTTPException, OSError):
        return "retry", "connection_error", None, 0, 0.0


def download(url: str, policy: FetchPolicy, gate, rng: random.Random | None = None,
             sleep=time.sleep) -> Download:
    """GET `url` within the host's schedule (`gate`: acquire(host) / release(host, pause_s)),
    retrying what may pass at most `policy.max_attempts` requests in all."""
    rng = rng or random.Random()
    host = host_of(url)
    if not host:
        return Download(url, "rejected", "bad_url")
    reason, status = "", 0
    for attempt in range(1, policy.max_attempts + 1):
        gate.acquire(host)
        kind, pause = "retry", 0.0
        try:
            kind, reason, body, status, pause = _attempt(url, policy)
        finally:
            gate.release(host, min(pause, policy.backoff_max_s))
        if kind == "ok":
            return Download(url, "ok", body=body, status=status, attempts=attempt)
        if kind == "reject":
            return Download(url, "rejected", reason, status=status, attempts=attempt)
        if attempt < policy.max_attempts:
            backoff = rng.uniform(0, min(policy.backoff_max_s, policy.backoff_s * 2 ** (attempt - 1)))
            sleep(max(backoff, min(pause, policy.backoff_max_s)))
    return Download(url, "failed", reason, status=status, attempts=policy.max_attempts)
