"""One writer per run folder.

    lock = RunLock(out)      # refused with one line naming the holder's pid while another run trains there
    ...
    lock.release()

The lock is an flock on RUN_DIR/train.lock, held by the training process (rank 0 of a torchrun
group): the kernel releases it when that process ends in any way, kill -9 included, so a crash
never leaves a stale lock to clear by hand. The file keeps the holder's pid, for the message, and
goes when the holder lets go (a file left by a killed holder is not locked, and is taken over).

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
        # the folders made here, deepest first: a run that never starts leaves none of them behind
        self.made = [p for p in (self.out, *self.out.absolute().parents) if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        self.fd = None
        if fcntl is None:
            return
        path = self.out / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{self.out} is in use by another training process (pid {holder}); wait for it to "
                                f"end or stop it (kill -TERM {holder}, which saves checkpoints/last), or choose "
                                "another --out") from None
            # the holder before us removes the file as it lets go: the lock is ours only if the file
            # we locked is still the one at the path
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        """Unlock and remove the lock's file (a holder killed at once leaves it, unlocked: harmless);
        the folders this lock made are removed again if nothing else was written there."""
        if self.fd is not None:
            (self.out / LOCK_FILE).unlink(missing_ok=True)  # while still locked: see __init__
            os.close(self.fd)
            self.fd = None
        if self.made and not any(self.out.iterdir()):
            for folder in self.made:
                try:
                    folder.rmdir()
                except OSError:  # something else was written there meanwhile
                    break


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
