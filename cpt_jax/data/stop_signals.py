"""SIGTERM and Ctrl-C during preparation: recorded, then raised as ``PreparationStopped``.

``stop_on_signals`` installs the handlers around a preparation; ``check_stopped`` raises
at the safe points (between chunks of documents, while waiting for tokenizer workers,
before a domain is assembled), so nothing half-written is kept. The signals received
have one home: this module's ``_STOPPED``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from cpt_jax.data.prepare_errors import PreparationStopped


def check_stopped() -> None:
    """PreparationStopped if a stop signal came (``stop_on_signals``): checked between
    chunks of documents, while waiting for the tokenizer workers, before a domain is
    assembled and when the guarded block ends."""
    if _STOPPED:
        name = signal.Signals(_STOPPED[-1]).name
        raise PreparationStopped(
            f"preparation stopped by {name}; nothing half-written was kept (complete "
            f"domains and shards stay in the cache), run it again to go on.")


_STOPPED: list[int] = []  # the stop signals received inside stop_on_signals


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise PreparationStopped (the main thread only, and only for a
    signal whose current handler Python knows, so it can be restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        # Recorded, not raised here: the signal may land in a GC callback or under a
        # broad ``except``, which would swallow the exception (or print it). The
        # preparation loop checks between chunks of documents (``check_stopped``).
        _STOPPED.append(signum)

    # A handler installed outside Python could not be restored afterwards: such a signal
    # is left alone (getsignal is None), and so is SIGTERM in a jax.distributed run, whose
    # preemption sync manager catches it in C++ (Python cannot see that handler).
    jax = sys.modules.get("jax")
    distributed = jax is not None and getattr(getattr(jax, "distributed", None),
                                              "is_initialized", lambda: False)()
    _STOPPED.clear()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(s) is not None
                and not (s == signal.SIGTERM and distributed)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    check_stopped()  # a signal that came after the last check

