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
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["MeteorError", "MeteorScorer", "find_meteor_jar", "unavailable_reason"]

JAR_NAME = "meteor-1.5.jar"
_SHUTDOWN_TIMEOUT_S = 10


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
    return text.replace("|||", "").replace("  ", " ")


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

    def close(self) -> None:
        """End the process (politely, then by force) and release its files."""
        process = self._process
        if process.poll() is None:
            try:
                assert process.stdin is not None
                process.stdin.close()
                process.wait(timeout=_SHUTDOWN_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()

    def _ask(self, line: str) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(f"{line}\n".encode())
            self._process.stdin.flush()
        except OSError as error:
            raise self._failure(f"could not write to METEOR ({error})") from error

    def _answer(self) -> str:
        assert self._process.stdout is not None
        reply = self._process.stdout.readline().decode().strip()
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
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
        if not hypotheses:
            raise ValueError("no captions to score")
        statistics = []
        for hypothesis, refs in zip(hypotheses, references, strict=True):
            self._ask(" ||| ".join(("SCORE", " ||| ".join(refs), _hypothesis_field(hypothesis))))
            statistics.append(self._answer())
        self._ask(" ||| ".join(("EVAL", *statistics)))
        for _ in hypotheses:  # one score per caption, which the corpus score does not need
            self._answer()
        reply = self._answer()
        try:
            return float(reply)
        except ValueError as error:
            raise self._failure(f"METEOR answered {reply!r} instead of a score") from error
