"""``python -m tests.sleeper [args...]``: writes its pid to ``$SLEEPER_DIR/<pid>`` and sleeps
until killed, ignoring its arguments (SIGTERM too, as a jax.distributed process does): the
child process of tests/test_launch.py."""

import os
import signal
import time

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(os.path.join(os.environ["SLEEPER_DIR"], str(os.getpid())), "w") as f:
        f.write("up")
    time.sleep(600)
