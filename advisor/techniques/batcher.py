"""The dynamic batcher of a serving study: how many requests a batch may hold and how long
the oldest may wait for company. Searched only when a study measures under a request rate
(``--serving-rate``); the simulated server itself is ``advisor/serving.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from advisor import serving

KNOBS = ("serving_max_batch", "serving_max_wait_ms")
MAX_BATCH = (1, 2, 4, 8, 16, 32, 64)
MAX_WAIT_MS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0)


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int = 0  # 0: the study measures no serving load
    max_wait_ms: float = 0.0

    def __post_init__(self) -> None:
        # The simulator's own checks; 0 (off) is checked as 1 would be.
        off = self.max_batch == 0 and not isinstance(self.max_batch, bool)
        try:
            serving.ServingConfig(1 if off else self.max_batch, self.max_wait_ms)
        except ValueError as exc:
            raise ValueError(f"serving_{exc}" + (" (or 0: off)" if "max_batch" in str(exc) else "")) from None

    @property
    def enabled(self) -> bool:
        return self.max_batch > 0

    def simulated(self) -> serving.ServingConfig:
        return serving.ServingConfig(self.max_batch, self.max_wait_ms)

    def label(self) -> str:
        return f"b{self.max_batch}/w{self.max_wait_ms:g}ms" if self.enabled else "off"


def options(serving_study: bool) -> tuple[tuple, tuple]:
    """Batch sizes and waits to search under a serving load; none otherwise."""
    return (MAX_BATCH, MAX_WAIT_MS) if serving_study else ((), ())
