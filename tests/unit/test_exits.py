"""launcher/launch/exits.py: the exit deadline ends a process even while a C call holds the GIL."""

from __future__ import annotations

import subprocess
import sys
import time

from launcher.launch.exits import describe

# A catastrophic regex: minutes of matching inside one C call that never releases the GIL, as gloo's
# teardown did. A Python timer thread could not run meanwhile.
HOLDS_THE_GIL = "import re; re.match(r'(a+)+$', 'a' * 64 + 'b')"


def python(code: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def test_the_deadline_ends_a_process_stuck_with_the_gil_held_and_says_where():
    result, took = python(f"from launcher.launch import exits; exits.start_deadline(1.0); {HOLDS_THE_GIL}")
    assert result.returncode == 1
    assert took < 15, took  # 1 s, plus the interpreter's start on a busy machine
    assert "Timeout (0:00:01)!" in result.stderr and "<string>" in result.stderr  # the stack it was stuck in


def test_a_cancelled_deadline_lets_the_process_go_on():
    result, _ = python(
        "import time; from launcher.launch import exits; exits.start_deadline(0.5); exits.cancel_deadline(); "
        "time.sleep(1.5); print('went on')"
    )
    assert result.returncode == 0 and "went on" in result.stdout


def test_exit_codes_in_words():
    assert describe(2) == "invalid configuration"
    assert describe(6) == "could not write to the run directory (disk full?)"
    assert describe(143) == "stopped by SIGTERM"
    assert describe(-9) == "killed by SIGKILL"
