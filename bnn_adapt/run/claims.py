"""Claims: which process is running something right now, and whether it is gone.

Two invocations of one sweep on one directory (two terminals, two cluster jobs
after a restart) must not run the same row twice. A run directory is claimed
while its run works in it: ``run.lock`` there is created with ``O_EXCL`` (only
one process can), holds its owner (host, boot id, pid, the process's start
time) and is refreshed by a heartbeat thread while held. Another process that
finds it waits until it is released, then sees the finished results.

A claim whose owner is provably gone is stale and taken over: on the same
host and boot, when its pid no longer runs that process (a run killed with
SIGKILL); from another host (a shared file system), when its heartbeat is
older than ``stale_after_s``. The same owner record tells the Optuna search
which of its RUNNING trials were left by a killed search
(:mod:`bnn_adapt.search.owners`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from bnn_adapt.files import write_error

RUN_LOCK = "run.lock"
HEARTBEAT_S = 30.0  # how often a held claim's file is touched
STALE_AFTER_S = 600.0  # a claim from another host not touched for this long is stale
RECOVERY_STALE_S = 30.0  # taking over a stale claim takes milliseconds; a recovery mutex older than this is left over


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


def owner_gone(owner: dict | None, age_s: float | None, stale_after_s: float = STALE_AFTER_S) -> bool:
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
    if not isinstance(owner, dict):
        return "an unknown process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"pid {owner.get('pid')} on host {owner.get('host')} (since {since})"


# ----------------------------------------------------------------------------- claims


class Claim:
    """An exclusive claim on ``path`` (a lock file), taken over when its owner is gone.

    ``with Claim(path, what):`` waits while another live process holds it;
    :meth:`try_acquire` does not wait. ``waited`` tells whether someone else
    held it first (what they left may be finished now).
    """

    def __init__(
        self,
        path: str | Path,
        what: str,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
        poll_s: float = 1.0,
    ):
        self.path, self.what = Path(path), what
        self.heartbeat_s, self.stale_after_s, self.poll_s = heartbeat_s, stale_after_s, poll_s
        self.owner: dict | None = None
        self.waited = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- reading

    def holder(self) -> tuple[dict | None, float | None]:
        """The recorded owner (None if unreadable) and seconds since the file was last touched (None: no file)."""
        age = 0.0
        try:
            age = time.time() - self.path.stat().st_mtime
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):  # being written, or garbled
            return None, age
        return (owner if isinstance(owner, dict) else None), age

    # -- taking

    def try_acquire(self) -> dict | None:
        """Take the claim if free or stale; returns None when taken, else the live holder's record.
        A claim that cannot be written (a full or read-only disk) is one line naming it, and none is left."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        for _ in range(5):
            owner = this_process()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                held, age = self.holder()
                if age is None:
                    continue  # released in between: try again
                if held is None and age < RECOVERY_STALE_S:
                    return {"pid": "?", "host": "?", "since": time.time() - age}  # being written right now
                if isinstance(held, dict) and {k: held.get(k) for k in ("host", "pid", "start")} == {
                    k: owner[k] for k in ("host", "pid", "start")
                }:
                    raise RuntimeError(f"{self.what} is already claimed by this process ({self.path})") from None
                if not owner_gone(held, age, self.stale_after_s):
                    return held or {"pid": "?", "host": "?", "since": time.time() - age}  # garbled: wait it out
                self._take_over(held)
                continue
            except OSError as exc:
                raise write_error(self.path, exc) from exc
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(owner, f)
            except OSError as exc:  # an empty claim would hold the directory until it is stale
                with contextlib.suppress(OSError):
                    self.path.unlink()
                raise write_error(self.path, exc) from exc
            self.owner = owner
            self._start_heartbeat()
            return None
        held, _ = self.holder()
        return held or {"pid": "?", "host": "?", "since": time.time()}

    def acquire(self) -> Claim:
        """Take the claim, waiting while another live process holds it."""
        announced = False
        while (held := self.try_acquire()) is not None:
            if not announced:
                print(f"{self.what} is held by {describe(held)} ({self.path}): waiting for it", flush=True)
                announced = True
            self.waited = True
            time.sleep(self.poll_s)
        return self

    def _take_over(self, stale: dict | None) -> None:
        """Remove a stale claim, unless another process took it over first (one recovery at a time)."""
        mutex = self.path.with_name(self.path.name + ".recovery")
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - mutex.stat().st_mtime > RECOVERY_STALE_S:
                    mutex.unlink()
            time.sleep(0.05)
            return
        try:
            os.close(fd)
            held, age = self.holder()
            if age is not None and held == stale:  # still the one judged stale: nobody took over meanwhile
                self.path.unlink(missing_ok=True)
                print(
                    f"note: {self.what} was held by {describe(stale)}, which is gone: taking it over",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            mutex.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._beat = threading.Thread(target=beat, name=f"claim {self.path}", daemon=True)
        self._beat.start()

    # -- releasing

    def release(self) -> None:
        """Give the claim up (only if it is still ours)."""
        if self.owner is None:
            return
        self._stop.set()
        held, _ = self.holder()
        if held == self.owner:
            with contextlib.suppress(OSError):  # a read-only disk: the claim outlives its owner, then is taken over
                self.path.unlink(missing_ok=True)
        self.owner = None

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
    """Whether a live process other than this one holds ``run_dir``."""
    claim = run_claim(run_dir)
    owner, age = claim.holder()
    if age is None or (
        isinstance(owner, dict) and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()
    ):
        return False
    return not owner_gone(owner, age, claim.stale_after_s)
