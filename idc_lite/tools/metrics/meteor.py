"""METEOR 1.5 through the ``meteor-1.5.jar`` that pycocoevalcap ships, like the COCO toolkit runs it.

METEOR needs its Java implementation and paraphrase tables, so it is never approximated in Python:
when pycocoevalcap (which carries the jar) is not installed, or ``java`` is not on PATH,
:func:`unavailable_reason` says why and the caller reports METEOR as unavailable.

The protocol is pycocoevalcap's: one ``java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm``
process; for every caption a ``SCORE ||| ref ||| ... ||| hypothesis`` line answered by a line of
statistics; then one ``EVAL ||| stats ||| ...`` line answered by one score per caption and the
corpus score (computed from the summed statistics, so it is not the mean of the caption scores).
Unlike pycocoevalcap, the process is owned by a context manager (closed on exit, killed if it
hangs), its stderr goes to a file that is quoted when it fails, and a crash raises
:class:`MeteorError` instead of blocking forever or failing on an ``assert``.

Starting the process costs seconds (Java loads a 60 MB paraphrase table) where scoring a few hundred
captions costs a fraction of one, so :func:`score_shared` (what :func:`idc_lite.tools.metrics.score`
and ``score_by_category`` use) keeps one process for every call in this Python process: started on
first use, replaced when it has died, dropped after a call that failed midway (its answers can no
longer be trusted to line up), closed when Python exits or by :func:`close_shared`. While it waits it
holds about 1 GB of memory. :func:`start_shared` starts it ahead of time, so that its start-up
overlaps other work (captioning the pairs it will score).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["MeteorError", "MeteorScorer", "close_shared", "find_meteor_jar", "score_shared", "shared_pid",
           "start_shared", "unavailable_reason"]

JAR_NAME = "meteor-1.5.jar"
_SHUTDOWN_TIMEOUT_S = 10
#: How long the shared process may take to end on its own (it has nothing to save) before it is killed.
_SHARED_SHUTDOWN_TIMEOUT_S = 0.2


class MeteorError(RuntimeError):
    """The METEOR process failed or answered something unexpected."""


def find_meteor_jar() -> Path | None:
    """The ``meteor-1.5.jar`` inside the installed pycocoevalcap package, or None."""
    try:
        spec = importlib.util.find_spec("pycocoevalcap")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        jar = Path(location) / "meteor" / JAR_NAME
        if jar.is_file():
            return jar
    return None


def unavailable_reason() -> str | None:
    """Why METEOR cannot be computed here (missing pycocoevalcap or java), or None if it can."""
    if find_meteor_jar() is None:
        return f"pycocoevalcap is not installed (it ships {JAR_NAME}); pip install pycocoevalcap"
    if shutil.which("java") is None:
        return "java is not on PATH (METEOR 1.5 runs on a Java runtime)"
    return None


def _hypothesis_field(text: str) -> str:
    """The toolkit's cleaning of a hypothesis before it goes into a ``|||``-separated line."""
    return _one_line(text.replace("|||", "").replace("  ", " "))


def _one_line(text: str) -> str:
    """``text`` with its line breaks as spaces: one per request line, or every later answer is misread."""
    return text.replace("\r", " ").replace("\n", " ")


class MeteorScorer:
    """One METEOR 1.5 process; score any number of caption sets with it, then close it.

    Use as a context manager::

        with MeteorScorer() as meteor:
            value = meteor.score(hypotheses, references)
    """

    def __init__(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise MeteorError(f"METEOR unavailable: {reason}")
        jar = find_meteor_jar()
        assert jar is not None
        command = ["java", "-jar", "-Xmx2G", JAR_NAME, "-", "-", "-stdio", "-l", "en", "-norm"]
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: METEOR's stderr can never block it
        try:
            self._process = subprocess.Popen(
                command, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
            )
        except OSError as error:
            self._stderr.close()
            raise MeteorError(f"could not start {' '.join(command)} in {jar.parent}: {error}") from error

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """The Java process's id."""
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the Java process is still there (it may still be loading)."""
        return self._process.poll() is None

    def close(self, timeout: float = _SHUTDOWN_TIMEOUT_S) -> None:
        """End the process (politely, then by force after ``timeout`` seconds) and release its files."""
        process = self._process
        if process.poll() is None:
            try:
                assert process.stdin is not None
                process.stdin.close()
                process.wait(timeout=timeout)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:  # a write buffered for a process that is gone
                    pass
        self._stderr.close()

    def _ask(self, line: str) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(f"{line}\n".encode())
            self._process.stdin.flush()
        except (OSError, ValueError) as error:  # ValueError: our end of the pipe is closed
            raise self._failure(f"could not write to METEOR ({error})") from error

    def _answer(self) -> str:
        assert self._process.stdout is not None
        try:
            reply = self._process.stdout.readline().decode().strip()
        except (OSError, ValueError) as error:
            raise self._failure(f"could not read from METEOR ({error})") from error
        if not reply:
            raise self._failure("METEOR stopped answering")
        return reply

    def _failure(self, what: str) -> MeteorError:
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace").strip()
        tail = "\n".join(stderr.splitlines()[-15:])
        status = self._process.poll()
        exited = f" (java exited with status {status})" if status is not None else ""
        return MeteorError(f"{what}{exited}" + (f"; its stderr ends with:\n{tail}" if tail else ""))

    def score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """Corpus METEOR of tokenized captions against their tokenized references (aligned lists)."""
        _check_lengths(hypotheses, references)
        statistics = []
        for hypothesis, refs in zip(hypotheses, references, strict=True):
            self._ask(" ||| ".join(("SCORE", " ||| ".join(map(_one_line, refs)), _hypothesis_field(hypothesis))))
            statistics.append(self._answer())
        self._ask(" ||| ".join(("EVAL", *statistics)))
        for _ in hypotheses:  # one score per caption, which the corpus score does not need
            self._answer()
        reply = self._answer()
        try:
            return float(reply)
        except ValueError as error:
            raise self._failure(f"METEOR answered {reply!r} instead of a score") from error


def _check_lengths(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no captions to score")


# --------------------------------------------------------------------- one process for every call

_shared_lock = threading.Lock()
_shared: MeteorScorer | None = None
_shared_owner: int | None = None  # the process that started it (a forked child must not use its pipes)


def _live_shared() -> MeteorScorer:
    """The shared scorer, started if there is none, replaced if its process has died; hold the lock."""
    global _shared, _shared_owner
    if _shared is not None and _shared_owner != os.getpid():
        _shared = None  # inherited through fork: its pipes are the parent's, and so is closing it
    if _shared is not None and not _shared.running:
        _shared.close()
        _shared = None
    if _shared is None:
        _shared, _shared_owner = MeteorScorer(), os.getpid()
    return _shared


def score_shared(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """:meth:`MeteorScorer.score` on the process this Python process shares for every call (module doc).

    Thread-safe: calls take turns. A call that fails midway (the process died, or the call was
    interrupted) raises as it would on a scorer of its own, and the process is closed with it: the
    next call starts another. Raises :class:`MeteorError` when METEOR is unavailable.
    """
    global _shared
    _check_lengths(hypotheses, references)
    with _shared_lock:
        scorer = _live_shared()
        try:
            return scorer.score(hypotheses, references)
        except BaseException:
            scorer.close(_SHARED_SHUTDOWN_TIMEOUT_S)
            _shared = None
            raise


def start_shared() -> int | None:
    """Start the shared process now, if METEOR is available here, without waiting for it to load: its
    start-up then overlaps whatever comes before the first :func:`score_shared`. Its process id, or
    None when METEOR is unavailable (:func:`unavailable_reason`)."""
    if unavailable_reason() is not None:
        return None
    with _shared_lock:
        return _live_shared().pid


def shared_pid() -> int | None:
    """The shared process's id while it runs, else None."""
    with _shared_lock:
        scorer = _shared
        return scorer.pid if scorer is not None and _shared_owner == os.getpid() and scorer.running else None


def close_shared() -> None:
    """End the shared process, if this Python process started one (also done when Python exits)."""
    global _shared
    # A call that hangs in another thread must not keep Python from exiting: after a while the process
    # is ended under it (that call then fails).
    locked = _shared_lock.acquire(timeout=_SHUTDOWN_TIMEOUT_S)
    try:
        if _shared is not None and _shared_owner == os.getpid():
            _shared.close(_SHARED_SHUTDOWN_TIMEOUT_S)
        _shared = None
    finally:
        if locked:
            _shared_lock.release()


def _forget_after_fork() -> None:
    """In a forked child: no lock held by a thread the child does not have, no process that is the parent's."""
    global _shared_lock, _shared
    _shared_lock, _shared = threading.Lock(), None


atexit.register(close_shared)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
