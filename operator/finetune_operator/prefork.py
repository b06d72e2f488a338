"""Warm starts for stage programs on one machine (local mode): import the ML stack once, fork each stage from it.

Every stage program imports torch, transformers and datasets before it does anything: ~10 s of CPU per stage on a
small machine, most of a short run. A prefork server is a process that imports them once, with the environment
the stages will have, and forks a stage per request. The child becomes what `python -m finetune_operator.stages
...` would have been: the same argv, the exact environment asked for, its own session, stdout and stderr on the
given file, Python's default signal handlers, fresh numpy and `random` seeds, atexit handlers run at exit and the
exit code (or -signal) reported like Popen's. What the server imported is frozen out of the child's garbage
collections (gc.freeze), as the stages do for themselves before training (stages/contract.py).

Anything that could make a forked child differ from a fresh one starts a fresh process instead:
- an environment variable other than the per-process ones in `RUNTIME_ONLY_ENV` that differs from the server's
  (libraries read HF_HOME & co. once, at import);
- a server in which CUDA is initialised: a child forked after that cannot use the GPU (PyTorch's own rule). On a
  machine with a GPU the server therefore imports only `CORE`, which leaves CUDA alone: PEFT initialises it at
  import when bitsandbytes is installed (seen on an H100), so `LATER` is imported by each stage itself there;
- a server that is gone, or has a second Python thread (the child could wait forever on a lock it held);
- `FINETUNE_PREFORK=0`.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import glob
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from typing import IO, Any

# Read per process at run time (rendezvous, buffering), never at import: a child may differ from its server in them.
RUNTIME_ONLY_ENV = frozenset(
    {
        "PYTHONUNBUFFERED",
        "MASTER_ADDR",
        "MASTER_PORT",
        "NNODES",
        "NODE_RANK",
        "JOB_COMPLETION_INDEX",  # an indexed Job's pod index: the worker's NODE_RANK
        "NPROC_PER_NODE",
        "WORLD_SIZE",
        "FINETUNE_CPUS",  # the pod's CPU request: the stage sets its math threads from it (runner.limit_math_threads)
    }
)
# What the stages import, most expensive first; the server forks only after CORE and loads the rest in between.
CORE = ("torch", "transformers", "transformers.modeling_utils", "transformers.models.auto", "datasets")
LATER = ("peft", "transformers.trainer", "trl", "evaluate", "scipy.stats")
MAX_SERVERS = 2
_PR_SET_PDEATHSIG = 1


def enabled() -> bool:
    return os.environ.get("FINETUNE_PREFORK", "1").lower() not in {"0", "false", "no", "off"}


def gpu_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd"))


# ------------------------------------------------------------------------------------------------ the parent side


class ForkedProcess:
    """What a Popen gives its caller (pid, poll, wait, signals, stdout), for a process forked by a server."""

    def __init__(self, pid: int, stdout: IO[str] | None) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._ended = threading.Event()

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class PreforkServer:
    """One warm server process and the children it forked; talks over a SEQPACKET socket pair."""

    def __init__(self, env: dict[str, str], core: tuple[str, ...] = CORE, later: tuple[str, ...] = LATER) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        argv = [str(theirs.fileno()), str(os.getpid()), ",".join(core), ",".join(later)]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator.prefork", *argv],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C at the terminal is for the run, which stops the stages itself
        )
        theirs.close()
        self._children: dict[int, ForkedProcess] = {}
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="prefork-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            if "exited" in message:
                self._child(message["exited"])._exited(int(message["code"]))
            else:
                self._replies.put(message)
        self._replies.put({"error": "the prefork server is gone"})
        for child in list(self._children.values()):
            if child.returncode is None:
                child._exited(_reaped_elsewhere(child.pid))

    def _child(self, pid: int) -> ForkedProcess:
        with self._lock:
            return self._children.setdefault(pid, ForkedProcess(pid, None))

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, stdout: int, timeout: float) -> ForkedProcess:
        """Fork `python -m MODULE ARGS` (argv as for Popen) with stdout and stderr on the file descriptor `stdout`.

        Raises OSError when the server cannot (gone, busy importing past `timeout`, refused)."""
        request = {"argv": argv, "env": env, "cwd": cwd}
        with self._lock:
            if self._closed:
                raise OSError("the prefork server is closed")
            socket.send_fds(self._sock, [json.dumps(request).encode()], [stdout])
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            self.close()  # its late answer would be taken for the next request's
            raise OSError(f"the prefork server did not answer within {timeout:.0f} s") from None
        if "error" in reply:
            raise OSError(reply["error"])
        return self._child(int(reply["pid"]))

    def alive(self) -> bool:
        return not self._closed and self._process.poll() is None

    def close(self) -> None:
        """Stop the server, and with it any child still running (callers stop their children first)."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._sock.close()


def _reaped_elsewhere(pid: int) -> int:
    """The exit code of a child whose server died before it reported: unknown, so a failure (not 0)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return -signal.SIGKILL


class Launcher:
    """Starts stage processes: forked from a warm server where the child would be the same as a fresh process,
    else fresh (Popen). One per local run; `close()` stops its servers."""

    def __init__(
        self,
        warm: bool | None = None,
        core: tuple[str, ...] = CORE,
        later: tuple[str, ...] | None = None,
        runtime_only: frozenset[str] = RUNTIME_ONLY_ENV,
    ) -> None:
        self.warm = enabled() if warm is None else warm
        self.runtime_only = runtime_only
        self.preload = core, (() if gpu_present() else LATER) if later is None else later
        self._servers: dict[frozenset[tuple[str, str]], PreforkServer] = {}
        self.forked = self.fresh = 0
        self.servers_started = 0
        self.why_fresh = ""  # why the last process that could have been forked was started fresh

    def server_env(self, env: dict[str, str], defaults: dict[str, str]) -> dict[str, str]:
        """The environment a child has when its imports run: `env` and the `defaults` the program sets for itself
        before importing (its caches), less what is only read at run time."""
        base = {k: v for k, v in env.items() if k not in self.runtime_only}
        return {**{k: v for k, v in defaults.items() if k not in base}, **base}

    def _server_for(self, env: dict[str, str], defaults: dict[str, str]) -> PreforkServer | None:
        if not self.warm:
            return None
        wanted = self.server_env(env, defaults)
        key = frozenset(wanted.items())
        server = self._servers.get(key)
        if server is not None and not server.alive():
            server.close()
            del self._servers[key]
            server = None
        if server is None and len(self._servers) < MAX_SERVERS:
            server = self._servers[key] = PreforkServer({**wanted, "PYTHONUNBUFFERED": "1"}, *self.preload)
            self.servers_started += 1
        return server

    def start(
        self,
        argv: list[str],
        env: dict[str, str],
        defaults: dict[str, str] | None = None,
        cwd: str | None = None,
        output: int | None = None,
        tied: bool = False,
    ) -> Any:
        """A Popen-like process running `argv` (`[python, -m, module, ...]`) in a session of its own, its output
        (stdout and stderr) on `.stdout` as text lines, or on the file descriptor `output`. `defaults`: see
        `server_env`. A forked child dies with its server; `tied`: a fresh one dies with the calling thread."""
        server = self._server_for(env, defaults or {}) if _is_module_call(argv) else None
        if server is not None:
            read, write = os.pipe() if output is None else (None, output)
            try:
                child = server.spawn(argv, env, cwd or os.getcwd(), write, timeout=300)
            except OSError as exc:
                self.why_fresh = str(exc)
            else:
                if read is not None:
                    child.stdout = open(read, encoding="utf-8", errors="replace")  # noqa: SIM115 (the caller's)
                    read = None
                self.forked += 1
                return child
            finally:
                for fd in {read, write} - {None, output}:
                    os.close(fd)
        self.fresh += 1
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE if output is None else output,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=die_with_parent if tied else None,
        )

    def close(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_module_call(argv: list[str]) -> bool:
    return len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m"


def die_with_parent() -> None:
    """SIGKILL this process when its parent (thread) dies, even by SIGKILL (Linux; elsewhere nothing)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ the server side


def serve(sock: socket.socket, parent: int, core: Iterable[str] = CORE, later: Iterable[str] = LATER) -> None:
    """Import `core`, then answer fork requests, importing `later` between them; report every child's exit.
    Returns when the parent closes the socket or dies (the children, tied to this process, die with it)."""
    for module in core:
        _preload(module)
    pending = list(later)
    while os.getppid() == parent:
        ready, _, _ = select.select([sock], [], [], 0 if pending else 0.2)
        if ready:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
            if not data:
                break
            _answer(sock, json.loads(data), fds)
        elif pending:
            _preload(pending.pop(0))
        _report_exits(sock)


def _preload(module: str) -> None:
    with contextlib.suppress(Exception):  # a missing extra: the stage reports it itself, with the fix
        __import__(module)


def _answer(sock: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    try:
        # Python threads could hold a lock the child would wait on forever. Native ones (torch's, pyarrow's
        # jemalloc) are the ones every PyTorch DataLoader worker inherits when it forks: their libraries allow it.
        if threading.active_count() > 1:
            reply: dict[str, Any] = {"error": "the prefork server has a second thread; forking it is not safe"}
        elif cuda_initialised():
            reply = {"error": "an import initialised CUDA in the prefork server; a forked child could not use the GPU"}
        else:
            reply = {"pid": _fork(request, fds[0], sock)}
    except Exception as exc:
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        for fd in fds:
            os.close(fd)
    sock.send(json.dumps(reply).encode())


def cuda_initialised() -> bool:
    """Whether CUDA is initialised in this process, after which a forked child's GPU calls fail. Only whether the
    driver library is loaded would not do: `import torch` loads it (seen on an H100) and forking after that is
    safe, as every DataLoader worker shows."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _report_exits(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            sock.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def _fork(request: dict[str, Any], output: int, sock: socket.socket) -> int:
    # What the server imported stays out of the child's garbage collections (half a million objects: ~0.5 s per
    # full collection, and the Trainer asks for one at every train's end), and the collector does not write to
    # the pages the child shares with the server. CPython's gc.freeze() documentation describes this use.
    gc.freeze()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        sock.close()
        _become(request, output)
        code = _run_module(request["argv"])
    except BaseException:  # a child must never return into the server's loop
        with contextlib.suppress(Exception):
            import traceback

            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _become(request: dict[str, Any], output: int) -> None:
    """Make this forked child what a fresh `python -m ...` started by Popen(start_new_session=True) would be,
    except that it dies with its server (and so with the run that started the server): no orphan outlives it."""
    os.setsid()
    die_with_parent()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(null)
    os.close(output)
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # `python -m` puts its working directory first
    os.environ.clear()
    os.environ.update(request["env"])
    buffering = 1 if os.environ.get("PYTHONUNBUFFERED") else -1
    sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=buffering, closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    if "numpy" in sys.modules:  # a fresh process seeds numpy from the OS; a fork would share the server's state
        sys.modules["numpy"].random.seed()


def _run_module(argv: list[str]) -> int:
    import runpy

    sys.argv = [argv[2], *argv[3:]]
    try:
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    except SystemExit as done:
        if done.code is None:
            return 0
        if isinstance(done.code, int):
            return done.code
        print(done.code, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    # Not PR_SET_PDEATHSIG here: it fires when the parent *thread* that started this server ends (a test
    # cluster's loop thread, say), while its children may still be running.
    with contextlib.suppress(KeyboardInterrupt):
        serve(sock, int(args[1]), *(tuple(filter(None, names.split(","))) for names in args[2:4]))


if __name__ == "__main__":
    main()
