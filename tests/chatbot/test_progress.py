"""The spinner: drawn on a terminal only, cleared when stopped, silent everywhere else."""

from __future__ import annotations

import io
import time

from chatbot.progress import Spinner


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_spinner_draws_on_a_terminal_and_clears_its_line():
    terminal = FakeTerminal()
    with Spinner("waiting for the enclave", stream=terminal, interval_s=0.01):
        time.sleep(0.05)
    text = terminal.getvalue()
    assert "waiting for the enclave" in text
    assert text.endswith("\r\x1b[K")  # the line is clear for the answer


def test_spinner_is_silent_when_not_a_terminal():
    pipe = io.StringIO()
    with Spinner("waiting", stream=pipe, interval_s=0.01) as spinner:
        time.sleep(0.03)
    assert pipe.getvalue() == "" and not spinner.enabled


def test_stop_is_idempotent_and_nothing_is_drawn_after_it():
    terminal = FakeTerminal()
    spinner = Spinner("waiting", stream=terminal, interval_s=0.01).start()
    time.sleep(0.02)
    spinner.stop()
    drawn = terminal.getvalue()
    spinner.stop()
    time.sleep(0.03)
    assert terminal.getvalue() == drawn
