"""SIGINT and SIGTERM while a run trains: stop after the current step, checkpoint there, then interrupt.

- :func:`sigterm_as_interrupt`: for a whole command, SIGTERM (a scheduler's or ``kill``'s stop) raises
  ``KeyboardInterrupt`` like Ctrl-C, so the command line records an "interrupted" event and exits 130 (143 for
  SIGTERM) instead of dying without a word.
- :class:`StopRequest`: inside a training loop, the first SIGINT / SIGTERM only sets a flag; the loop finishes the
  step it is in, writes a checkpoint of it and raises :class:`Interrupted` (a ``KeyboardInterrupt``), so at most
  the current step is lost and ``--resume auto`` / a rerun continues exactly. A second signal interrupts at once.

Handlers are installed only in the main thread and in a single-process run (under torchrun, ranks that stop at
different steps would wait for each other forever; there the launcher's signal ends the ranks as before).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Iterable, Iterator, Optional

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal after checkpointing ``step``; ``signum`` says which signal."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class sigterm_as_interrupt:
    """Context manager: SIGTERM raises ``KeyboardInterrupt`` (with ``.signum``) while it is active."""

    def __enter__(self) -> "sigterm_as_interrupt":
        self.old = None
        if _main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        exc = KeyboardInterrupt(signal.Signals(signum).name)
        exc.signum = signum  # type: ignore[attr-defined]
        raise exc

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


class StopRequest:
    """Context manager for a training loop: ``stop.signum`` is set by the first SIGINT / SIGTERM (the loop then
    checkpoints and raises :class:`Interrupted`); a second signal raises ``KeyboardInterrupt`` at once.
    ``enabled=False`` (a distributed run) installs nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and _main_thread()
        self.signum: Optional[int] = None
        self.old: dict = {}

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            self.old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            sigterm_as_interrupt._raise(signum, frame)
        self.signum = signum
        logger.warning("%s received: stopping after the current step (checkpoint written there); send it again "
                       "to stop at once", signal.Signals(signum).name)

    def during(self, steps: Iterable[int]) -> Iterator[int]:
        """Iterate ``steps`` with the handlers installed; they are removed when the loop ends, breaks or raises
        (the generator is closed as soon as the loop's frame lets go of it)."""
        with self:
            yield from steps

    def __exit__(self, *exc: Any) -> None:
        for s, old in self.old.items():
            signal.signal(s, old)
        self.old = {}


__all__ = ["StopRequest", "Interrupted", "sigterm_as_interrupt"]
