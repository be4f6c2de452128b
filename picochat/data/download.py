"""Resumable, verified, parallel HTTP downloads of corpus shards (standard library only).

`picochat data download --dataset fineweb-edu --num-shards 8` (see picochat/data/prepare.py) fetches hub parquet
shards through `download_shards`, then writes a manifest so the loader reads them like any other corpus.

Each file is streamed into `<name>.partial`; an interrupted transfer resumes from the partial's size with an HTTP
Range request; the result is checked against Content-Length (and an expected size / sha256 when given) and only then
renamed into place, so a final file is never truncated or corrupt. Transient failures (timeouts, resets, 5xx, 429)
are retried with exponential backoff; being offline (DNS failure, connection refused) fails at once with one line.
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from urllib.parse import urlsplit

from picochat.common import UserError
from picochat.data.corpus import file_sha256

CHUNK = 1 << 20
# HTTP statuses worth retrying: the server is busy or briefly broken, not "this file does not exist".
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class _Retry(Exception):
    """A transient failure: try again (resuming) after a backoff."""


def _offline_reason(err: BaseException) -> str | None:
    """'DNS lookup failed' / 'connection refused' when `err` means the host cannot be reached at all."""
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, socket.gaierror):
        return "DNS lookup failed"
    if isinstance(reason, ConnectionRefusedError) or getattr(reason, "errno", None) in (errno.ECONNREFUSED,
                                                                                       errno.ENETUNREACH,
                                                                                       errno.EHOSTUNREACH):
        return "connection refused / unreachable"
    return None


def _total_size(resp, offset: int) -> int | None:
    """Full file size from a 206's Content-Range or a 200's Content-Length (None when the server omits both)."""
    if resp.status == 206:
        m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            raise _Retry(f"server answered Range bytes={offset}- with Content-Range "
                         f"'{resp.headers.get('Content-Range')}'")
        return int(m.group(3)) if m.group(3) != "*" else None
    length = resp.headers.get("Content-Length")
    return int(length) if length is not None else None


def _attempt(url: str, partial: Path, timeout: float) -> int | None:
    """One request: append to `partial` from its current size. Returns the file's total size (None if unknown).
    Raises _Retry when the transfer stopped early or failed in a way worth retrying."""
    offset = partial.stat().st_size if partial.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "picochat", "Accept-Encoding": "identity"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left past `offset`: the partial is already complete (checked later)
            return None
        if e.code in RETRY_STATUS:
            raise _Retry(f"HTTP {e.code}") from None
        raise UserError(f"download of {url} failed: HTTP {e.code} {e.reason}; check --base-url and the shard "
                        f"index") from None
    except urllib.error.URLError as e:
        if _offline_reason(e):
            raise
        raise _Retry(str(e.reason)) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Retry(repr(e)) from None
    with resp:
        if resp.status == 200 and offset:  # the server ignored Range: start over rather than append a second copy
            offset = 0
        total = _total_size(resp, offset)
        with open(partial, "ab" if offset else "wb") as out:
            try:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    out.write(block)
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                raise _Retry(f"transfer interrupted after {out.tell()} bytes ({e!r})") from None
            got = out.tell()
    if total is not None and got < total:
        raise _Retry(f"connection closed after {got} of {total} bytes")
    return total


def download_file(url: str, dest: str | Path, *, expected_size: int | None = None, sha256: str | None = None,
                  retries: int = 5, backoff: float = 2.0, timeout: float = 30.0) -> str | None:
    """Download `url` to `dest` (resumable, verified, atomic). Returns the file's sha256.

    An existing `dest` is kept: checked against `sha256` when given, else not re-hashed (returns None), so re-running
    a download of hundreds of shards is quick. Up to `retries` retries, waiting
    backoff·2^k seconds. Offline, a 4xx, a size or hash mismatch: UserError at once, and no file at `dest`.
    """
    dest = Path(dest)
    if dest.exists():
        if not sha256:
            return None
        digest = file_sha256(dest)
        if digest != sha256:
            raise UserError(f"{dest} exists but its sha256 {digest[:12]}… is not the expected {sha256[:12]}…; "
                            f"delete it and re-run the download")
        return digest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    host = urlsplit(url).netloc
    for attempt in range(retries + 1):
        try:
            total = _attempt(url, partial, timeout)
            break
        except urllib.error.URLError as e:
            raise UserError(f"cannot reach {host} ({_offline_reason(e)}: {e.reason}) while fetching {url}; "
                            f"check your internet connection or --base-url") from None
        except _Retry as e:
            if attempt == retries:
                raise UserError(f"download of {url} failed after {retries + 1} attempts ({e}); re-run to resume "
                                f"from {partial}") from None
            time.sleep(backoff * 2**attempt)
    size = partial.stat().st_size if partial.exists() else 0
    want = expected_size if expected_size is not None else total
    if want is not None and size != want:
        partial.unlink(missing_ok=True)
        raise UserError(f"download of {url} has {size} bytes, expected {want}; the partial file was removed, "
                        f"re-run to fetch it again")
    if total is not None and expected_size is not None and total != expected_size:
        partial.unlink(missing_ok=True)
        raise UserError(f"{url} is {total} bytes on the server, expected {expected_size}; wrong URL or dataset "
                        f"version")
    digest = file_sha256(partial)
    if sha256 and digest != sha256:
        partial.unlink(missing_ok=True)
        raise UserError(f"download of {url} has sha256 {digest}, expected {sha256}; the file was removed, re-run "
                        f"to fetch it again (or check the checksum list)")
    os.replace(partial, dest)
    return digest


def download_shards(urls: dict[str, str], dest_dir: str | Path, *, workers: int = 4,
                    checksums: dict[str, str] | None = None, progress=print, **kwargs) -> dict[str, str | None]:
    """Fetch {file name: url} into `dest_dir` with `workers` threads. Returns {file name: sha256 or None}.

    The first failure cancels the downloads not yet started and is raised (in-flight ones finish or fail on their
    own; their partial files stay for the next run to resume).
    """
    dest_dir = Path(dest_dir)
    checksums = checksums or {}
    done: dict[str, str | None] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(download_file, url, dest_dir / name, sha256=checksums.get(name), **kwargs): name
                   for name, url in urls.items()}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                if fut.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise fut.exception()
                done[futures[fut]] = fut.result()
                progress(f"  {futures[fut]} ok ({len(done)}/{len(urls)})")
    return done
