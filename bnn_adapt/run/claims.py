"""Claims: one process at a time in a run directory, and which process is running something.

Two invocations of one sweep on one directory (two terminals, two cluster jobs
after a restart) must not run the same row twice. A run directory is claimed
while its run works in it: an OS lock on ``run.lock`` there (``filelock``, i.e.
``flock``, which NFS v4 and Lustre mounted with ``flock`` hold across hosts).
The OS releases it when its process ends, however it ends, so a run killed
with SIGKILL leaves nothing to clean up. Another process that finds it held
waits, naming the holder (``run.lock.owner``: host, pid, start), then sees the
finished results.

The owner record (host, boot id, pid and the process's start time, so that a
reused pid is told apart) also tells the Optuna search which of its RUNNING
trials a killed search left (:mod:`bnn_adapt.search.owners`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import filelock

from bnn_adapt.files import write_error

RUN_LOCK = "run.lock"
OWNER_SUFFIX = ".owner"  # beside the lock: who holds it, for the message of a process that waits


# ----------------------------------------------------------------------------- owners


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def boot_id() -> str | None:
    """This boot of this machine (Linux): pids are only comparable within one boot."""
    text = _read("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def process_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux), so that a reused pid is told apart."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])  # field 22 of proc(5); the name before ")" may hold spaces
    except (IndexError, ValueError):
        return None


def this_process() -> dict:
    """The owner record of the calling process."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot": boot_id(),
        "pid": pid,
        "start": process_start(pid),
        "since": time.time(),
    }


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def owner_gone(owner: dict | None, age_s: float | None, stale_after_s: float) -> bool:
    """Whether the process ``owner`` describes has certainly ended.

    ``age_s``: seconds since the owner's last sign of life (heartbeat), if known.
    On this machine the pid answers; elsewhere only the heartbeat can.
    """
    if not isinstance(owner, dict):
        return age_s is None or age_s > stale_after_s
    me = this_process()
    if owner.get("host") == me["host"]:
        if owner.get("boot") and me["boot"] and owner["boot"] != me["boot"]:
            return True  # the machine rebooted since
        pid = owner.get("pid")
        if not isinstance(pid, int) or not pid_running(pid):
            return True
        started = owner.get("start")
        return started is not None and process_start(pid) not in (None, started)  # the pid was reused
    return age_s is not None and age_s > stale_after_s


def describe(owner: dict | None) -> str:
    if not isinstance(owner, dict) or "pid" not in owner:
        return "an unknown process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"pid {owner.get('pid')} on host {owner.get('host')} (since {since})"


# ----------------------------------------------------------------------------- claims

#: the claims this process holds (an OS lock is per open file: a second claim here would wait for itself)
HELD: set[Path] = set()


class Claim:
    """An exclusive claim on ``path`` (an OS file lock), released by the OS when its process ends.

    ``with Claim(path, what):`` waits while another process holds it; :meth:`try_acquire` does not wait.
    ``waited`` tells whether someone else held it first (what they left may be finished now).
    """

    def __init__(self, path: str | Path, what: str, poll_s: float = 1.0):
        self.path, self.what, self.poll_s = Path(path).absolute(), what, poll_s
        self.owner_file = self.path.with_name(self.path.name + OWNER_SUFFIX)
        self.lock = filelock.FileLock(self.path, mode=0o666)
        self.owner: dict | None = None
        self.waited = False

    def holder(self) -> dict | None:
        """The holder's owner record, when it wrote one that can be read."""
        try:
            owner = json.loads(self.owner_file.read_text())
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def try_acquire(self) -> dict | None:
        """Take the claim if free: None when taken, else the holder's record (``{}`` when unknown).
        A claim that cannot be made (a full or read-only disk) is one line naming it."""
        if self.path in HELD:
            raise RuntimeError(f"{self.what} is already claimed by this process ({self.path})")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.lock.acquire(timeout=0)
        except filelock.Timeout:
            return self.holder() or {}
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        HELD.add(self.path)
        self.owner = this_process()
        try:  # only a waiting process's message reads it
            self.owner_file.write_text(json.dumps(self.owner))
        except OSError:
            with contextlib.suppress(OSError):
                self.owner_file.unlink(missing_ok=True)
        return None

    def acquire(self) -> Claim:
        """Take the claim, waiting while another process holds it."""
        announced = False
        while (held := self.try_acquire()) is not None:
            if not announced:
                print(f"{self.what} is held by {describe(held)} ({self.path}): waiting for it", flush=True)
                announced = True
            self.waited = True
            time.sleep(self.poll_s)
        return self

    def release(self) -> None:
        """Give the claim up."""
        if self.owner is None:
            return
        if self.holder() == self.owner:
            with contextlib.suppress(OSError):
                self.owner_file.unlink(missing_ok=True)
        self.owner = None
        HELD.discard(self.path)
        self.lock.release()

    def __enter__(self) -> Claim:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_claim(run_dir: str | Path) -> Claim:
    """The claim on a run directory."""
    return Claim(Path(run_dir) / RUN_LOCK, f"run directory {run_dir}")


def file_claim(path: str | Path, what: str) -> Claim:
    """The claim on a file being made (a base checkpoint being pretrained): ``.<name>.lock`` beside it."""
    path = Path(path)
    return Claim(path.with_name(f".{path.name}.lock"), what)


def held_by_another(run_dir: str | Path) -> bool:
    """Whether another process holds ``run_dir``."""
    claim = run_claim(run_dir)
    if claim.path in HELD or not claim.path.exists():
        return False
    try:
        claim.lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    except OSError:
        return False
    claim.lock.release()
    return False
