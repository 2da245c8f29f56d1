"""A slow check that runs in the background while the rest of the suite does: started at
collection (conftest.py starts each test module's BACKGROUND[test name] that was
selected), in a low-priority process group of its own, so that it takes the core the
other tests leave idle; the test that needs its result waits for it."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable


class BackgroundRun:
    def __init__(self, command: list[str], unavailable: Callable[[], str | None] = lambda: None, **popen_args):
        """unavailable(): why it cannot run here (the test skips), or None."""
        self.command, self.popen_args, self._unavailable = command, popen_args, unavailable
        self.proc: subprocess.Popen | None = None

    @functools.cached_property
    def unavailable(self) -> str | None:
        return self._unavailable()

    def start(self) -> None:
        if self.proc is not None or self.unavailable:
            return
        # To files: a pipe nobody reads would stall it. They outlive this call: wait() reads them.
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen(self.command, stdout=self.out, stderr=self.err, text=True,
                                     start_new_session=True, **self.popen_args)
        # Lowered from here, not by a preexec_fn (unsafe once torch has started threads):
        # the group's members now, and the children they start later inherit it.
        os.setpriority(os.PRIO_PGRP, self.proc.pid, 10)

    def wait(self) -> tuple[int, str, str]:
        """(returncode, stdout, stderr), started here if it was not."""
        if self.unavailable:
            raise RuntimeError(f"{self.command[:3]} cannot run here: {self.unavailable}")
        self.start()
        returncode = self.proc.wait()
        self.out.seek(0)
        self.err.seek(0)
        return returncode, self.out.read(), self.err.read()

    def stop(self) -> None:
        """At the end of the session: killed (its whole group) if no test waited for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.out.close()
        self.err.close()
