"""Bookkeeping for bench/run: commands, child processes, mounts and loop
devices.

Everything the harness starts is registered in a `Cleanup` stack and undone
in reverse order on a normal exit, on an exception, and on SIGINT, SIGTERM
and SIGHUP. Child processes are started under `setpriv --pdeathsig TERM`, so
that they get SIGTERM even if the harness itself is killed with SIGKILL.
"""

import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time


class BenchError(Exception):
    """A failure that must stop the run (and make bench/run exit non-zero)."""


def log(msg):
    print(f"# {msg}", file=sys.stderr, flush=True)


def fmt_cmd(args):
    return " ".join(shlex.quote(str(a)) for a in args)


def run(args, timeout=600, input=None, check=True, env=None, cwd=None):
    """Run a command to completion (in `cwd` if given); return (stdout,
    stderr). Raises BenchError if it fails (with check) or runs longer than
    `timeout` s."""
    args = [str(a) for a in args]
    try:
        p = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout} s: {fmt_cmd(args)}") from e
    except OSError as e:
        raise BenchError(f"cannot run {fmt_cmd(args)}: {e}") from e
    if check and p.returncode != 0:
        raise BenchError(
            f"failed (exit {p.returncode}): {fmt_cmd(args)}\n"
            f"stdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}"
        )
    return p.stdout, p.stderr


def timed(args, timeout=600):
    """Run a command; return its wall time in seconds."""
    t = time.monotonic()
    run(args, timeout=timeout)
    return time.monotonic() - t


class Cleanup:
    """A stack of undo actions, run newest first."""

    def __init__(self):
        self._stack = []
        self._next = 0

    def push(self, label, fn):
        self._next += 1
        self._stack.append((self._next, label, fn))
        return self._next

    def pop(self, token):
        """Remove the action `token` and run it now."""
        for i, (t, label, fn) in enumerate(self._stack):
            if t == token:
                del self._stack[i]
                fn()
                return
        raise KeyError(token)

    def run_all(self):
        errors = []
        while self._stack:
            _, label, fn = self._stack.pop()
            try:
                fn()
            except BaseException as e:  # keep undoing the rest
                errors.append(f"{label}: {e}")
        for e in errors:
            log(f"cleanup problem: {e}")
        return errors


def install_signal_handlers():
    """Turn SIGTERM and SIGHUP into SystemExit so `finally` blocks run."""

    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def mounted(path):
    """True if `path` is a mount point (per /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4 and fields[4].replace("\\040", " ") == real:
                return True
    return False


class Process:
    """A long-running child (a server or an export)."""

    def __init__(self, cleanup, args, logfile, label, stdout_pipe=False):
        self.label = label
        self.args = [str(a) for a in args]
        self.logfile = logfile
        self._log = open(logfile, "ab")
        self._log.write(f"\n=== {fmt_cmd(self.args)}\n".encode())
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "TERM", "--"] + self.args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else self._log,
                stderr=self._log,
            )
        except OSError as e:
            self._log.close()
            raise BenchError(f"cannot start {label}: {e}") from e
        self._token = cleanup.push(f"stop {label}", self._stop)
        self._cleanup = cleanup

    def log_tail(self):
        try:
            with open(self.logfile, "rb") as f:
                return f.read()[-3000:].decode(errors="replace")
        except OSError:
            return ""

    def check_alive(self):
        rc = self.proc.poll()
        if rc is not None:
            raise BenchError(
                f"{self.label} exited with status {rc} ({fmt_cmd(self.args)})\n"
                f"log {self.logfile}:\n{self.log_tail()}"
            )

    def read_line(self, timeout):
        """Read one line of the child's stdout (stdout_pipe=True)."""
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.label} printed no ready line in {timeout} s")
            r, _, _ = select.select([fd], [], [], min(left, 0.2))
            if r:
                chunk = os.read(fd, 1)
                if not chunk:
                    self.proc.wait(timeout=5)
                    self.check_alive()
                    raise BenchError(f"{self.label} closed its stdout")
                buf += chunk
        return buf.decode().rstrip("\n")

    def wait_until(self, predicate, what, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if predicate():
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.label}: {what} not ready after {timeout} s\n"
                    f"log {self.logfile}:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self):
        self._cleanup.pop(self._token)
        return self.exit_status

    def _stop(self, timeout=60):
        self.exit_status = self.proc.poll()
        if self.exit_status is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.exit_status = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.exit_status = self.proc.wait()
                log(f"{self.label} ignored SIGTERM for {timeout} s; killed")
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


def socket_ready(path):
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Loop:
    """A loop device over a file (buffered: the same for every export)."""

    def __init__(self, cleanup, file):
        out, _ = run(["losetup", "-f", "--show", file], timeout=60)
        self.dev = out.strip()
        if not self.dev.startswith("/dev/loop"):
            raise BenchError(f"losetup printed {self.dev!r}")
        self._cleanup = cleanup
        self._token = cleanup.push(f"detach {self.dev}", self._detach)

    def detach(self):
        self._cleanup.pop(self._token)

    def _detach(self):
        detach_loop(self.dev)


def detach_loop(dev):
    """Detach a loop device and wait until the kernel has really let it go.

    `losetup -d` on a device that is still briefly busy (a just-unmounted file
    system, udev probing it) only sets autoclear and returns; the device then
    stays attached for a moment, so we retry and check sysfs.
    """
    err = ""
    for _ in range(100):
        if not os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop"):
            return
        _, err = run(["losetup", "-d", dev], check=False, timeout=60)
        if not os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop"):
            return
        time.sleep(0.1)
    raise BenchError(f"cannot detach {dev}: {err.strip()}")


class FsMount:
    """A file system mounted from a device."""

    def __init__(self, cleanup, dev, where, options=None):
        os.makedirs(where, exist_ok=True)
        args = ["mount"] + (["-o", options] if options else []) + [dev, where]
        run(args, timeout=120)
        self.where = where
        self._cleanup = cleanup
        self._token = cleanup.push(f"umount {where}", self._umount)

    def umount(self):
        self._cleanup.pop(self._token)

    def _umount(self):
        _, err = run(["umount", self.where], check=False, timeout=600)
        if mounted(self.where):
            run(["umount", "-l", self.where], check=False, timeout=60)
            raise BenchError(f"umount {self.where} failed ({err.strip()}); lazily unmounted")


def unmount_fuse(path):
    """Last resort for a FUSE mount whose server is gone."""
    if mounted(path):
        run(["fusermount3", "-u", "-z", path], check=False, timeout=60)
    if mounted(path):
        run(["umount", "-l", path], check=False, timeout=60)


def allocated_bytes(path):
    """Bytes the file occupies on the host (st_blocks * 512, like du)."""
    return os.stat(path).st_blocks * 512
