"""Child processes that Ctrl-C can reach whatever started the tests.

A shell without job control starts its background commands with SIGINT ignored (`cmd &`, nohup), and a
child inherits that; Python then keeps SIGINT ignored and never raises KeyboardInterrupt, so a test that
sends SIGINT to a CLI it started would see the job run to its end. Tests that send SIGINT start the child
with `preexec_fn=sigint_default`: the disposition a terminal gives it."""

from __future__ import annotations

import signal


def sigint_default() -> None:
    """Run in the child before exec: SIGINT back to its default, so Python installs its KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
