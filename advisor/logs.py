"""Library messages that are not the user's business on the terminal.

Importing torchao (which ``transformers`` does when it builds a model) logs a "Failed to
load" line for every kernel library built for another GPU or Python, and torch's pytree
module logs a deprecation for each Enum torchao registers. They say nothing about the
user's model. In the study process (and the fork server trials start from) they are
appended to ``libraries.log`` in the cache directory, whose path the study passes on in
``ADVISOR_LIBRARY_LOG``; in a trial process they go to the trial's log with its other output.
"""

from __future__ import annotations

import logging
from pathlib import Path

NOISY = ("torchao", "torch.utils._pytree", "torch_pruning")
ENV = "ADVISOR_LIBRARY_LOG"


class _FileLog(logging.Handler):
    """Appends records to ``path``, creating its directory on the first one."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as out:
                out.write(self.format(record) + "\n")
        except OSError:  # a log nobody can write is not worth failing a study for
            pass


def quiet_libraries(path: str | Path) -> None:
    """Route the ``NOISY`` libraries' log records to ``path`` instead of the terminal."""
    _route(_FileLog(Path(path)))


def to_stream(stream) -> None:
    """Route the ``NOISY`` libraries' log records to ``stream`` (a trial's redirected stderr)."""
    _route(logging.StreamHandler(stream))


def _route(handler: logging.Handler) -> None:
    for name in NOISY:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
