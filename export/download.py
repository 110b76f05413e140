"""Downloads that show progress, resume, verify and are cached.

A file is first written to ``<name>.partial``; an interrupted download resumes from there with an
HTTP ``Range`` request (or restarts when the server ignores ranges), and only a complete file is
renamed into place, so the cache never holds a truncated file under its real name. Files stored in
Git LFS are followed to their media URL.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from idc_lite.hashing import file_sha256

from .errors import DownloadError

logger = logging.getLogger("export")

USER_AGENT = "idc-lite-export"
CHUNK = 1 << 20
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


def cache_dir() -> Path:
    """Where downloads are kept: ``$IDC_LITE_CACHE``, else ``~/.cache/idc-lite``."""
    return Path(os.environ.get("IDC_LITE_CACHE", Path.home() / ".cache" / "idc-lite")).expanduser()


def _open(url: str, offset: int = 0, timeout: float = 60):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the partial file is already complete
            return None
        raise DownloadError(url, f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(url, f"cannot connect ({reason}); check the network, or build from a local --adapter") from None


def fetch(url: str, dest: Path, sha256: str | None = None, progress: bool | None = None) -> Path:
    """Download ``url`` to ``dest`` unless already there; resume a partial download; check ``sha256``."""
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or file_sha256(dest) == sha256):
        logger.info("cached: %s", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    offset = partial.stat().st_size if partial.exists() else 0
    response = _open(url, offset)
    if response is not None:
        with response:
            resumed = offset and response.status == 206
            if offset and not resumed:
                offset = 0  # the server sent the whole file again
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            try:
                _copy(response, partial, "ab" if resumed else "wb", offset, total, dest.name, progress)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(url, f"interrupted ({exc}); run again to resume") from None
    if _incomplete(partial, response):
        raise DownloadError(url, "the connection closed before the whole file arrived; run again to resume")
    if sha256 is not None and file_sha256(partial) != sha256:
        partial.unlink()
        raise DownloadError(url, "downloaded content does not match the expected sha256")
    os.replace(partial, dest)
    if _is_lfs_pointer(dest):
        media = lfs_media_url(url)
        if media is None:
            raise DownloadError(url, "is a Git LFS pointer and no media URL is known for it")
        dest.unlink()
        return fetch(media, dest, sha256, progress)
    return dest


def _incomplete(partial: Path, response) -> bool:
    if response is None:
        return False
    length = response.headers.get("Content-Length")
    if length is None:
        return False
    start = 0
    content_range = response.headers.get("Content-Range")
    if response.status == 206 and content_range:
        start = int(content_range.split()[1].split("-")[0])
    return partial.stat().st_size != start + int(length)


def _copy(response, partial: Path, mode: str, offset: int, total: int | None, label: str, progress) -> None:
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    with open(partial, mode) as out, tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, desc=label, disable=not show, file=sys.stderr
    ) as bar:
        while block := response.read(CHUNK):
            out.write(block)
            bar.update(len(block))


def _is_lfs_pointer(path: Path) -> bool:
    if path.stat().st_size > 1024:
        return False
    return path.read_bytes().startswith(LFS_POINTER)


def lfs_media_url(raw_url: str) -> str | None:
    """``https://raw.githubusercontent.com/o/r/ref/p`` -> ``https://media.githubusercontent.com/media/o/r/ref/p``."""
    parts = urllib.parse.urlsplit(raw_url)
    if parts.netloc != "raw.githubusercontent.com":
        return None
    return urllib.parse.urlunsplit((parts.scheme, "media.githubusercontent.com", "/media" + parts.path, "", ""))


def fetch_json(url: str):
    response = _open(url)
    with response:
        try:
            return json.loads(response.read().decode("utf-8"))
        except ValueError:
            raise DownloadError(url, "the answer is not JSON") from None
