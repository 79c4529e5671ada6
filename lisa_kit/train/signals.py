"""Stopping a training run on SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption).

While :class:`StopSignals` is active the first signal only sets a flag: the trainer
finishes the optimizer step it is in, all ranks agree on stopping at that step boundary,
a checkpoint is written and the process exits with ``128 + signal number`` (130 for
SIGINT, 143 for SIGTERM; the shells' convention). A second signal is acknowledged and
does not interrupt the checkpoint: under ``torchrun`` a Ctrl-C reaches every worker
twice, from the terminal and forwarded by the launcher. A third signal aborts at once
with :class:`Interrupted`; the checkpoint being written then stays a ``.tmp`` leftover
and the previous one is untouched (:mod:`lisa_kit.train.checkpointing` writes atomically).
Once a run stops, ``lisa-kit train`` ignores later signals while its process exits (the
launcher's SIGTERM when another rank ended first), so every rank ends with 130/143.
"""
from __future__ import annotations

import os
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)
ABORT_AFTER = 3  # signals: the first stops at the step boundary, the second is acknowledged


def exit_code(signum: int) -> int:
    """The conventional exit status of a process ended by ``signum``: 128 + its number."""
    return 128 + int(signum)


class Interrupted(KeyboardInterrupt):
    """Raised by the :data:`ABORT_AFTER`-th signal: stop now, without the checkpoint.
    ``signum``: the signal of the first one (it decides the exit code)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"{signal.Signals(signum).name} received {ABORT_AFTER} times")


# The first signal any StopSignals of this process acted on (the run stops with its exit code).
_stopped_by: int | None = None


def ignore_signals_after_stop() -> None:
    """For a command's process (``lisa-kit train``; main thread): once a run has stopped on
    a signal, a later SIGINT/SIGTERM -- the launcher's, sent when it sees another rank end
    -- is ignored while the process finishes, so it ends with the stop's own exit code
    (130/143), not killed by the signal (-15). Before a stop, and outside the run, the
    signals keep their usual effect (the handlers in place are called)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in HANDLED:
        previous = signal.getsignal(s)

        def late(signum, frame, previous=previous):
            if _stopped_by is not None:
                return  # the process is ending with the stop's exit code already
            if callable(previous):
                return previous(signum, frame)
            if previous != signal.SIG_IGN:  # SIG_DFL: what the signal would have done
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(s, late)


def ignore_signals_to_exit() -> None:
    """After a run stopped on a signal, just before the process exits: SIGINT/SIGTERM
    ignored at the C level, which (unlike a Python handler, reset when the interpreter
    finalizes) lasts until the process is gone (see :func:`ignore_signals_after_stop`)."""
    if _stopped_by is None or threading.current_thread() is not threading.main_thread():
        return
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)


def stderr_line(text: str) -> None:
    """One line to stderr for a signal handler: ``os.write``, not ``print``, because a handler
    that prints can land inside the main thread's own write to stderr (the progress bar) and
    raise "reentrant call" there, killing the run it meant to stop cleanly."""
    os.write(2, (text + "\n").encode("utf-8", "replace"))


class StopSignals:
    """Context manager: SIGINT/SIGTERM set :attr:`received` instead of ending the process.

    ``announce(text)`` reports each signal (rank 0 prints it on stderr). Outside the main
    thread (where Python cannot install handlers) it does nothing and the signals keep
    their usual effect."""

    def __init__(self, announce=None):
        self.received: int | None = None  # the first signal's number
        self.count = 0
        self._announce = announce or stderr_line
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def stopping(self, signum: int) -> None:
        """The run stops for ``signum`` (on this rank's own signal or, agreed at the step
        boundary, another rank's): later signals no longer end the process
        (:func:`ignore_signals_after_stop`)."""
        global _stopped_by
        _stopped_by = int(signum)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the trainer process decides
            return
        self.count += 1
        name = signal.Signals(signum).name
        if self.received is None:
            global _stopped_by
            self.received = signum
            _stopped_by = signum
            self._announce(f"{name} received: stopping after the current step with a checkpoint")
        elif self.count < ABORT_AFTER:
            self._announce(f"{name} received again: still stopping with a checkpoint "
                           f"(signal {ABORT_AFTER - self.count} more time(s) to abort without it)")
        else:
            raise Interrupted(self.received)
