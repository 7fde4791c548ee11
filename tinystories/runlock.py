"""One writer per run folder.

    lock = RunLock(out)      # refused with one line naming the holder's pid while another run trains there
    ...
    lock.release()

The lock is an flock on RUN_DIR/train.lock, held by the training process (rank 0 of a torchrun
group): the kernel releases it when that process ends in any way, kill -9 included, so a crash
never leaves a stale lock to clear by hand. The file keeps the holder's pid, for the message.

`watch_launcher()` makes a torchrun rank stop (as on SIGTERM: finish the step, save, exit) once its
launcher is gone: killed with -9, the launcher cannot stop its ranks, which would train on as
orphans beside the next run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from tinystories.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None

LOCK_FILE = "train.lock"


class RunLock:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self.fd = None
        if fcntl is None:
            return
        fd = os.open(self.out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.out} is in use by another training process (pid {holder}); wait for it to end "
                            f"or stop it (kill -TERM {holder}, which saves checkpoints/last), or choose another --out"
                            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        """Unlock; a folder this lock made and nothing else wrote into is removed again."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.created and {p.name for p in self.out.iterdir()} <= {LOCK_FILE}:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
            self.out.rmdir()


def watch_launcher(interval: float = 0.5) -> None:
    """Send this process SIGTERM once its parent (torchrun's agent) has gone: every rank sees the
    same, so all stop together at the end of a step and checkpoints/last is saved."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        print(f"the torchrun launcher (pid {parent}) is gone: stopping at the end of this step",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()
