"""Stopping a run on SIGINT (Ctrl+C) or SIGTERM (batch schedulers, Kubernetes) without losing a meta-step.

    with StopOnSignal(run.stop_file) as stop:      # the driver, in the main thread
        meta_train(...)  /  fit(...)               # raises Stopped(step) once the checkpoint of `step` is saved
    exit code 128 + stop.signum                    # 130 for SIGINT, 143 for SIGTERM, as a shell reports them

The first signal asks the loop to stop: the driver creates the run directory's ``STOP`` file, which rank 0
looks for once per meta-step and shares with the other workers in that step's all-reduce, so every worker
stops after the same meta-step, and a checkpoint of that step is written. Should that take more than
``grace`` seconds (a long meta-step, the final meta-test), or on a second signal, the run stops at once and
its newest periodic checkpoint is the way back. Either way ``--resume`` finishes it as if undisturbed.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

log = logging.getLogger("metanas_ray")

GRACE_SECONDS = 20
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


_active: "StopOnSignal | None" = None


def reclaim_signals() -> None:
    """After ``ray.init``: give SIGINT and SIGTERM back to the active :class:`StopOnSignal`, if any."""
    if _active is not None:
        _active.reclaim()


class Stopped(Exception):
    """Meta-training stopped on request after meta-step ``step``, whose checkpoint is saved."""

    def __init__(self, step: int):
        super().__init__(f"stopped after meta-step {step}")
        self.step = step


class Interrupted(KeyboardInterrupt):
    """A second signal, or the grace period ran out: the run stops at once."""


class StopOnSignal:
    """Turns SIGINT and SIGTERM into a stop request for ``stop_file`` while the ``with`` block runs.

    ``signum`` is the first signal received (None: none); ``exit_code`` is 128 + it. Outside the main
    thread (where Python cannot install handlers) it does nothing."""

    def __init__(self, stop_file: str | Path, grace: float = GRACE_SECONDS):
        self.stop_file = Path(stop_file)
        self.grace = grace
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    def __enter__(self) -> "StopOnSignal":
        global _active
        self.stop_file.unlink(missing_ok=True)  # a request left by a run killed before it could clear it
        if threading.current_thread() is threading.main_thread():
            for s in (*_SIGNALS, signal.SIGALRM):
                self._previous[s] = signal.signal(s, self._handle)
            _active = self
        return self

    def reclaim(self) -> None:
        """Install the handlers again: ``ray.init`` puts a SIGTERM handler of its own (a crash dump) in their place."""
        if self._previous and threading.current_thread() is threading.main_thread():
            for s in (*_SIGNALS, signal.SIGALRM):
                signal.signal(s, self._handle)

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        if self._previous:
            signal.alarm(0)
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous.clear()
        try:
            self.stop_file.unlink(missing_ok=True)
        except OSError:
            pass

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGALRM:
            raise Interrupted(f"no meta-step ended within {self.grace:g} s of {self.name}")
        if self.signum is not None:
            raise Interrupted(f"{signal.Signals(signum).name} again")
        self.signum = signum
        try:
            self.stop_file.touch()
        except OSError as e:  # an unwritable run directory: no way to ask the workers, stop at once
            raise Interrupted(f"cannot ask the workers to stop ({e})") from None
        log.warning("%s: stopping after the meta-step under way and saving its checkpoint (at most %g s; "
                    "%s again stops at once)", self.name, self.grace, self.name)
        signal.alarm(max(1, round(self.grace)))
