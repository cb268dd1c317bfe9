"""Preemption contract between the processes and the SLURM scripts.

On SIGUSR1 (sent by SLURM before the time limit, `--signal=B:USR1@N`, forwarded by the batch script) or
SIGTERM (preemption, scancel) a process finishes what it is doing, saves its state and exits with
PREEMPT_EXIT_CODE; slurm/launch.sh and the sbatch scripts turn that code into `scontrol requeue`.
"""
from __future__ import annotations

import signal
from types import FrameType

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Records the first preemption signal instead of dying; poll `requested` at safe points."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum)

    def install(self) -> "PreemptionFlag":
        """Handle the preemption signals from now on. A flag installed before (`catch_early`) hands over the
        signal it recorded, and `restore` goes back to the handlers that were there before it."""
        for sig in PREEMPT_SIGNALS:
            previous = signal.signal(sig, self._handle)
            earlier = getattr(previous, "__self__", None)
            if isinstance(earlier, PreemptionFlag) and earlier is not self:
                self.signal = self.signal or earlier.signal
                previous = earlier._previous.get(sig, signal.SIG_DFL)
            self._previous[sig] = previous
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def catch_early() -> PreemptionFlag:
    """Record a preemption signal that comes during start-up (imports, config, model and data checks), before
    the command installs its own flag, which then takes it over: SIGUSR1's default action would kill the
    process (exit 138) instead of the exit 75 that requeues the job."""
    return PreemptionFlag().install()
