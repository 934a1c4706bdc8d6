"""SIGTERM / SIGINT become a request to stop after the current step.

A TPU VM receives SIGTERM shortly before it is preempted; Ctrl-C sends SIGINT.
Either sets a flag that the training loop checks after every step: it then
saves a checkpoint, waits for it to be written and raises `Preempted`.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after saving the checkpoint of `step`."""

    def __init__(self, step: int, signal_name: str, workdir: str):
        self.step = step
        self.signal_name = signal_name
        self.exit_code = 128 + signal.Signals[signal_name].value
        super().__init__(
            f"{signal_name} received: stopped after step {step} and saved its "
            f"checkpoint in {workdir}. Run the same command again to resume."
        )


class StopRequest:
    """Which signal asked the loop to stop, if any."""

    def __init__(self):
        self.signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGINT set the yielded request instead of
    killing the process; a second signal of the same kind kills as usual.
    Outside the main thread (where handlers cannot be set) nothing changes."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}

    def handle(signum, frame):
        del frame
        request.signal_name = signal.Signals(signum).name
        signal.signal(signum, previous[signum])

    for sig in SIGNALS:
        signal.signal(sig, handle)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
