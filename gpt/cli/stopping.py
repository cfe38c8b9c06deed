"""How every command line stops on a signal: Ctrl-C (SIGINT) and SIGTERM both end the work through
``KeyboardInterrupt``, so ``finally`` blocks run (temp files and staging folders removed, the old output
kept), then one line on stderr and exit 130 (Ctrl-C) or 143 (SIGTERM, 128 + 15), as a shell reports them.

    with sigterm_raises():
        try:
            work()
        except KeyboardInterrupt as e:
            print("interrupted: nothing written", file=sys.stderr)
            return exit_code(e)
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the handler ``sigterm_raises`` installs."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextmanager
def sigterm_raises():
    """While inside, SIGTERM raises ``Terminated`` in the main thread (elsewhere, e.g. a command run from a
    worker thread, signals cannot be handled and this does nothing); the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def exit_code(e: KeyboardInterrupt) -> int:
    """143 for SIGTERM (``Terminated``), 130 for Ctrl-C."""
    return 143 if isinstance(e, Terminated) else 130
