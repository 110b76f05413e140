"""Pinned downloads: https to the expected hosts only, resumed with checks, verified before each use.

Every file is fetched against a :class:`Pin` (its sha256, or its Git object id at a pinned commit) and
is kept only if its content matches: after the download, and again each time it is taken from the
cache. So neither a server, a redirect nor a changed cache can slip other bytes into a build.

- URLs (and every redirect) must be ``https`` to a GitHub host (:func:`check_url`); another origin is
  accepted only when an environment override names it (``IDC_LITE_GITHUB_API``), and then over
  plain ``http`` only on this machine (a local mirror or a test server).
- A file is first written to ``<name>.partial``, opened without following symlinks. An interrupted
  download resumes from there with an HTTP ``Range`` request; the answer's ``Content-Range`` must
  start where the partial file ends, or the partial file is discarded and the download starts again.
  Only a complete file whose content matches its pin is renamed into place, so the cache never holds
  a truncated or foreign file under its real name.
- A file stored in Git LFS arrives as a pointer: the pointer is checked against the pin, and the
  media it names is then checked against the pointer's own sha256 and size (the pointer is kept
  beside the file, ``<name>.lfs``, so that the cached file can be checked again later).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import stat
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from idc_lite.hashing import file_sha256
from idc_lite.runtime import is_loopback

from .errors import DownloadError

logger = logging.getLogger("export")

USER_AGENT = "idc-lite-export"
CHUNK = 1 << 20
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
#: The largest file :func:`fetch` accepts (LoRA adapters are tens of MB; GitHub serves at most
#: 100 MB outside LFS): a server that streams without end is cut off here.
MAX_DOWNLOAD_BYTES = 2 << 30
#: The largest JSON answer (a folder listing) :func:`fetch_json` reads.
MAX_JSON_BYTES = 8 << 20
#: Hosts a download may be served from, redirects included, always over https.
GITHUB_HOSTS = ("github.com", "api.github.com")
#: ... and any host below this domain (raw files, LFS media and their storage).
GITHUB_CONTENT_DOMAIN = "githubusercontent.com"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_OID = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Pin:
    """What a downloaded file must be: its ``sha256``, or its ``git_blob`` (the object id Git gives it at
    a pinned commit; for a file stored in Git LFS, the id of its pointer). At least one is required."""

    sha256: str | None = None
    git_blob: str | None = None

    def __post_init__(self):
        if self.sha256 is None and self.git_blob is None:
            raise ValueError("a pin needs a sha256 or a git_blob")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ValueError(f"not a sha256: {self.sha256!r}")
        if self.git_blob is not None and not _GIT_OID.match(self.git_blob):
            raise ValueError(f"not a Git object id: {self.git_blob!r}")

    def matches(self, path: Path) -> bool:
        """Whether the file at ``path`` is the pinned file (for an LFS file, through its kept pointer)."""
        if self.sha256 is not None:
            return file_sha256(path) == self.sha256
        if git_blob_id(path) == self.git_blob:
            return True
        pointer = lfs_pointer_path(path)
        if not pointer.is_file() or git_blob_id(pointer) != self.git_blob:
            return False
        oid, size = parse_lfs_pointer(pointer.read_bytes(), str(pointer))
        return path.stat().st_size == size and file_sha256(path) == oid


def git_blob_id(path: Path) -> str:
    """The object id Git gives the file's content: sha1 of ``blob <size>\\0`` followed by the content."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def lfs_pointer_path(path: Path) -> Path:
    return path.with_name(path.name + ".lfs")


def cache_dir() -> Path:
    """Where downloads are kept: ``$IDC_LITE_CACHE``, else ``~/.cache/idc-lite``."""
    return Path(os.environ.get("IDC_LITE_CACHE", Path.home() / ".cache" / "idc-lite")).expanduser()


def check_origin(url: str, what: str) -> str:
    """Check a URL that an environment override gives (``what`` names it); returns it without a final ``/``.

    It must be https, or http to this machine (loopback), with no user name or password in it.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
        raise DownloadError(url, f"{what} must be an https URL (http only for a server on this machine)")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise DownloadError(url, f"{what} must be an https URL (http only for a server on this machine)")
    return url.rstrip("/")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def check_url(url: str, origins: tuple[str, ...] = ()) -> None:
    """Refuse a URL that is not https to a GitHub host, nor on one of ``origins`` (checked overrides)."""
    scheme, host, _ = _origin(url)
    if scheme == "https" and (host in GITHUB_HOSTS or host.endswith("." + GITHUB_CONTENT_DOMAIN)):
        return
    if any(_origin(url) == _origin(origin) for origin in origins):
        return
    raise DownloadError(url, "refused: downloads go over https to GitHub only "
                        "(or to the server an IDC_LITE_GITHUB_API override names)")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL that :func:`check_url` accepts."""

    def __init__(self, origins: tuple[str, ...]):
        self.origins = origins

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(urllib.parse.urljoin(req.full_url, newurl), self.origins)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(origins: tuple[str, ...]) -> urllib.request.OpenerDirector:
    """An opener with http(s) only (no file:, ftp: or data: handlers) and checked redirects."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    _CheckedRedirects(origins), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _open(url: str, offset: int = 0, timeout: float = 60, origins: tuple[str, ...] = ()):
    """The server's answer for ``url`` (from byte ``offset``), or None when it says that range is past the end."""
    check_url(url, origins)
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return _opener(origins).open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return None
        raise DownloadError(url, f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(url, f"cannot connect ({reason}); check the network, or build from a local --adapter") from None


def fetch(url: str, dest: Path, sha256: str | None = None, progress: bool | None = None, *,
          git_blob: str | None = None, origins: tuple[str, ...] = (), max_bytes: int = MAX_DOWNLOAD_BYTES) -> Path:
    """Download ``url`` to ``dest``, pinned by ``sha256`` and/or ``git_blob`` (one is required).

    A file already at ``dest`` is used if it matches the pin, else downloaded again. ``origins`` are
    URLs (checked overrides) whose scheme, host and port are accepted besides GitHub's.
    """
    try:
        pin = Pin(sha256, git_blob)
    except ValueError as exc:
        raise DownloadError(url, f"refused: not pinned ({exc})") from None
    dest = Path(dest)
    if dest.is_file():
        if pin.matches(dest):
            logger.info("cached and matching its pin: %s", dest)
            return dest
        logger.warning("%s does not match its pin; downloading it again", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    pointer = _checked_pointer(url, lfs_pointer_path(dest), pin)
    if pointer is None:
        _download(url, partial, progress, origins, max_bytes, dest.name, pin)
        if _is_lfs_pointer(partial):
            os.replace(partial, lfs_pointer_path(dest))
            pointer = _checked_pointer(url, lfs_pointer_path(dest), pin)
    if pointer is not None:  # a Git LFS file: its media, checked against the (checked) pointer
        media, (oid, size) = lfs_media_url(url), pointer
        if media is None:
            raise DownloadError(url, "is a Git LFS pointer and no media URL is known for it")
        if size > max_bytes:
            raise DownloadError(url, f"refused: {size} bytes, more than the {max_bytes} a download may be")
        url, pin = media, Pin(sha256=oid)
        _download(url, partial, progress, origins, size, dest.name, pin)
    else:
        _discard(lfs_pointer_path(dest))
    if not pin.matches(partial):
        partial.unlink()
        raise DownloadError(url, "downloaded content does not match its pinned sha256 / Git object id")
    os.replace(partial, dest)
    return dest


def _checked_pointer(url: str, pointer: Path, pin: Pin) -> tuple[str, int] | None:
    """The (sha256, size) a kept Git LFS pointer names, if there is one; it must match ``pin``."""
    if not pointer.is_file():
        return None
    oid, size = parse_lfs_pointer(pointer.read_bytes(), url)
    if (pin.git_blob is not None and git_blob_id(pointer) != pin.git_blob) or pin.sha256 not in (None, oid):
        pointer.unlink()
        raise DownloadError(url, "the Git LFS pointer does not match its pin")
    return oid, size


def _download(url: str, partial: Path, progress, origins, max_bytes: int, label: str, pin: Pin) -> None:
    """Bring ``partial`` to the whole body of ``url``: resume it, or start again when it cannot be resumed."""
    for _attempt in range(2):  # a second pass only after a partial file that could not be resumed is discarded
        offset = _partial_size(partial)
        response = _open(url, offset, origins=origins)
        if response is None:  # HTTP 416: the partial file is as long as the file, or longer
            if pin.matches(partial) or _is_lfs_pointer(partial):
                return
            _discard(partial)
            logger.warning("%s: the partial download of %s is not the file; downloading it again", url, label)
            continue
        with response:
            start, total = _answer_range(response, offset)
            if start is None:
                _discard(partial)
                logger.warning("%s: the server's Content-Range does not resume %s; downloading it again", url, label)
                continue
            if total is not None and total > max_bytes:
                raise DownloadError(url, f"refused: {total} bytes, more than the {max_bytes} a download may be")
            try:
                _copy(response, partial, start, total, label, progress, max_bytes, url)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(url, f"interrupted ({exc}); run again to resume") from None
        if total is not None and partial.stat().st_size != total:
            raise DownloadError(url, "the connection closed before the whole file arrived; run again to resume")
        return
    raise DownloadError(url, "the server does not resume downloads consistently; run again")


def _partial_size(partial: Path) -> int:
    """The size of a partial download to resume; anything but a regular file there is removed first."""
    try:
        info = partial.lstat()
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(info.st_mode):  # a symlink or anything else: never written through
        partial.unlink()
        return 0
    return info.st_size


def _answer_range(response, offset: int) -> tuple[int | None, int | None]:
    """Where the body starts in the file and the file's total size (None when unknown); start is None
    when a partial answer does not resume exactly at ``offset``."""
    length = response.headers.get("Content-Length")
    length = int(length) if length is not None and length.strip().isdigit() else None
    if response.status != 206:
        return 0, length  # the whole file (again)
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (response.headers.get("Content-Range") or "").strip())
    if not offset or match is None:
        return None, None
    first, last, total = int(match[1]), int(match[2]), match[3]
    if first != offset or last < first or (length is not None and length != last - first + 1):
        return None, None
    if total != "*" and int(total) != last + 1:
        return None, None
    return first, last + 1


def _copy(response, partial: Path, start: int, total: int | None, label: str, progress, max_bytes: int,
          url: str) -> None:
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_APPEND if start else os.O_TRUNC
    limit = min(max_bytes, total) if total is not None else max_bytes
    written, overflow = start, False
    with os.fdopen(os.open(partial, flags, 0o644), "ab" if start else "wb") as out, tqdm(
        total=total, initial=start, unit="B", unit_scale=True, desc=label, disable=not show, file=sys.stderr
    ) as bar:
        while block := response.read(CHUNK):
            written += len(block)
            if written > limit:
                overflow = True
                break
            out.write(block)
            bar.update(len(block))
    if overflow:
        partial.unlink()
        raise DownloadError(url, f"refused: the server sent more than {limit} bytes")


def parse_lfs_pointer(data: bytes, where: str) -> tuple[str, int]:
    """The sha256 and size a Git LFS pointer names."""
    fields = dict(line.split(" ", 1) for line in data.decode("ascii", "replace").splitlines() if " " in line)
    oid, size = fields.get("oid", ""), fields.get("size", "")
    if not oid.startswith("sha256:") or not _SHA256.match(oid[7:]) or not size.isdigit():
        raise DownloadError(where, "malformed Git LFS pointer (no sha256 oid or size)")
    return oid[7:], int(size)


def _is_lfs_pointer(path: Path) -> bool:
    if path.stat().st_size > 1024:
        return False
    return path.read_bytes().startswith(LFS_POINTER)


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def lfs_media_url(raw_url: str) -> str | None:
    """``https://raw.githubusercontent.com/o/r/ref/p`` -> ``https://media.githubusercontent.com/media/o/r/ref/p``."""
    parts = urllib.parse.urlsplit(raw_url)
    if parts.netloc != "raw.githubusercontent.com":
        return None
    return urllib.parse.urlunsplit((parts.scheme, "media.githubusercontent.com", "/media" + parts.path, "", ""))


def fetch_json(url: str, origins: tuple[str, ...] = ()):
    """A JSON answer (at most :data:`MAX_JSON_BYTES`) from an accepted URL."""
    response = _open(url, origins=origins)
    with response:
        body = response.read(MAX_JSON_BYTES + 1)
    if len(body) > MAX_JSON_BYTES:
        raise DownloadError(url, f"refused: the answer is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(body.decode("utf-8"))
    except ValueError:
        raise DownloadError(url, "the answer is not JSON") from None
