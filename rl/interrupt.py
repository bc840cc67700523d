"""A run stopped by its user (Ctrl-C) or by its host (SIGTERM: pod eviction, `ray job stop`)
ends cleanly: the iteration under way finishes, a checkpoint and a summary are written, and the
process exits 130 (SIGINT) or 143 (SIGTERM), the shell's codes for those signals.

The first signal only asks the training loop to stop after its iteration; a second one stops at
once (KeyboardInterrupt), for a user who cannot wait. Ray's own SIGTERM handler (`sys.exit`
from wherever the driver happens to be, then a C++ stack dump) is replaced while training runs.
"""

from __future__ import annotations

import signal
import sys
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequests:
    """Context manager: while open, SIGINT and SIGTERM set `signal` instead of killing the
    process. Handlers can only be set in the main thread; elsewhere (a Ray Tune trial) it does
    nothing and the host's handling stays."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict = {}

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.signal] if self.signal else 0

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:  # the second one: stop now
            self._restore()
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)
        print(
            f"\n{self.signal.name}: stopping after this iteration, with a checkpoint "
            "(Ctrl-C again to stop at once, without one)",
            file=sys.stderr, flush=True,
        )

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
