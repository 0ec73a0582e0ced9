"""Pick between compiled variants of one graph by timing the steps they run.

A prediction can be wrong: ``chunks="auto"`` once chose a chunking that made a step 1.21x slower
on a model it was not tuned on. So when the chunk transform predicts that chunking pays, both the
chunked and the unchunked graph are compiled, and the first steps of training run them in turn:

    call 0, 1        one of each (compilation and warm-up: not timed)
    call 2 .. 2+2n   alternately, n timed steps of each
    from then on     the faster one; the other is dropped

A step's time is the interval between two consecutive calls of the graph (the whole training step:
forward, backward, optimizer, data), measured with CUDA events on CUDA and the wall clock
elsewhere. Rank 0 decides from its medians and shares the decision through the store, so every
rank runs the same variant from the same call on (the variants issue different collectives).
The preferred variant (the unchunked one) wins ties: another only wins by ``min_gain``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

#: A faster variant must beat the preferred one by this fraction of its median step.
MIN_GAIN = 0.01


@dataclass
class ChoiceRecord:
    """What the choice measured and decided (JSON-able, shown by ``explain``)."""

    variants: list[str]
    preferred: str
    #: Variant -> its timed step intervals (seconds), on rank 0.
    samples: dict[str, list[float]] = field(default_factory=dict)
    chosen: str | None = None

    def medians(self) -> dict[str, float]:
        return {v: statistics.median(s) for v, s in self.samples.items() if s}

    def describe(self) -> str:
        med = ", ".join(f"{v} {t * 1e3:.2f} ms" for v, t in self.medians().items())
        return f"measured median steps: {med}; running {self.chosen}" if self.chosen else "measuring"


def decide(samples: dict[str, list[float]], preferred: str, min_gain: float = MIN_GAIN) -> str:
    """The variant with the least median step; the preferred one unless another beats it by
    ``min_gain`` of its median."""
    medians = {v: statistics.median(s) for v, s in samples.items() if s}
    best = min(medians, key=medians.__getitem__)
    if best != preferred and medians[best] > medians[preferred] * (1 - min_gain):
        return preferred
    return best


class _Clock:
    """Marks on the device's timeline (CUDA events) or the host's."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a: Any, b: Any) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


class MeasuredChoice:
    """A compiled-graph callable that runs ``variants`` in turn, then the fastest (see module doc).

    ``share(decision)`` returns rank 0's decision on every rank; ``on_decided(chosen, record)`` is
    told the outcome once (e.g. to drop the other variant's graphs from the capture log).
    """

    def __init__(
        self,
        variants: dict[str, Callable[..., Any]],
        preferred: str,
        device: torch.device,
        share: Callable[[str], str],
        on_decided: Callable[[str, ChoiceRecord], None] | None = None,
        trials: int = 3,
        min_gain: float = MIN_GAIN,
        clock: Any = None,
        is_rank0: bool = True,
    ) -> None:
        if preferred not in variants or len(variants) < 2:
            raise ValueError("MeasuredChoice needs two or more variants including the preferred one")
        self.variants = variants
        self.names = list(variants)
        self.record = ChoiceRecord(self.names, preferred, {v: [] for v in self.names})
        self.share = share
        self.on_decided = on_decided
        self.trials = trials
        self.min_gain = min_gain
        self.clock = clock or _Clock(device)
        self.is_rank0 = is_rank0
        self._calls = 0
        self._marks: list[tuple[Any, str]] = []
        self._chosen: Callable[..., Any] | None = None
        boxed = {bool(getattr(fn, "_boxed_call", False)) for fn in variants.values()}
        if len(boxed) != 1:
            raise ValueError("variants must share one calling convention")
        self._boxed_call = boxed.pop()

    @staticmethod
    def calls_to_decide(variants: int = 2, trials: int = 3) -> int:
        """Calls after which the choice is made (each variant once untimed, then ``trials``)."""
        return variants * (1 + trials)

    @property
    def _measuring_calls(self) -> int:
        return self.calls_to_decide(len(self.names), self.trials)

    def _finish(self) -> None:
        mark = self.clock.mark()
        marks = [*self._marks, (mark, "")]
        for i, (start, variant) in enumerate(marks[:-1]):
            if i >= len(self.names):  # the first call of each variant compiles: not timed
                self.record.samples[variant].append(self.clock.seconds(start, marks[i + 1][0]))
        mine = decide(self.record.samples, self.record.preferred, self.min_gain) if self.is_rank0 else ""
        chosen = self.share(mine)
        if chosen not in self.variants:
            raise RuntimeError(f"graphsched: rank 0 chose an unknown graph variant {chosen!r}")
        self.record.chosen = chosen
        self._chosen = self.variants[chosen]
        self.variants = {chosen: self._chosen}  # the others' graphs can be freed
        self._marks = []
        if self.on_decided is not None:
            self.on_decided(chosen, self.record)

    def __call__(self, *args: Any) -> Any:
        if self._chosen is None and self._calls == self._measuring_calls:
            self._finish()
        if self._chosen is not None:
            return self._chosen(*args)
        variant = self.names[self._calls % len(self.names)]
        self._calls += 1
        self._marks.append((self.clock.mark(), variant))
        return self.variants[variant](*args)


__all__ = ["ChoiceRecord", "MeasuredChoice", "decide"]
