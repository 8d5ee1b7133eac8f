"""The local multi-process launcher (experiments/lm/launch.py): a stopped launcher leaves no
process of its job behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_the_launcher_kills_its_processes(tmp_path):
    script = ("import sys; from experiments.lm import launch; "
              "sys.exit(launch.launch([], 2, 1, module='tests.sleeper', quiet=True))")
    env = dict(os.environ, SLEEPER_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.iterdir())) < 2:  # both children up (they ignore SIGTERM)
            assert parent.poll() is None and time.monotonic() < deadline, "children not up"
            time.sleep(0.1)
        pids = [int(p.name) for p in tmp_path.iterdir()]
        assert all(_alive(pid) for pid in pids)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        assert not any(_alive(pid) for pid in pids)  # killed and reaped by the launcher
    finally:
        if parent.poll() is None:
            parent.kill()
