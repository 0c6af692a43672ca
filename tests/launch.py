"""`python -m <module> <args>` for the tests, started in about 0.1 s instead of about 7.

A process test pays for the imports of torch, Lightning, transformers and Hydra at every start
(about 7 s of CPU on 2 cores, more than most of the runs it starts). Here the start is forked from
a server that imported them once (multiprocessing's forkserver, preloading the runner's modules),
and the child then does what ``python -m`` does: ``sys.argv``, the environment, the working dir
first on ``sys.path``, the module run as ``__main__``, its exit status (SystemExit's code, 1 and a
traceback on stderr for an uncaught exception), ``atexit`` handlers at the end. Its pid is a real
process's: it can be signalled (SIGKILL, SIGTERM) and it holds locks as itself.

A start whose working dir is not the repository root (a copy of the project) is a real
``sys.executable -m`` process: the server's modules are the root's. ``CL_BENCH_REAL_STARTS=1``
makes every start a real one (to check that the two agree). What a preloaded start cannot show is
the interpreter's own start-up; the tests that start the canonical command
(``test_cli_runs_end_to_end``), Lightning's launcher and torchrun keep real processes.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what a run imports, loaded once in the server (the rest of a run's imports are quick); vLLM where
#: it is installed (eval.engine=vllm imports it, about 5 s)
PRELOAD = ["runners.cl", "runners.report", "cl_bench.stream_run", "methods", "peft", "tests.launch"]
PRELOAD += ["vllm"] if importlib.util.find_spec("vllm") else []


def _real_starts() -> bool:
    return os.environ.get("CL_BENCH_REAL_STARTS", "") not in ("", "0")


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


#: a real start with a prelude: ``python -c BOOT prelude module args``
BOOT = (
    "import importlib, runpy, sys; "
    "name, fn = sys.argv[1].split(':'); getattr(importlib.import_module(name), fn)(); "
    "sys.argv = sys.argv[2:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def ready() -> None:
    """Wait until the preloaded server is up (it starts with the first preloaded start, about 7 s):
    for a test that times a start."""
    if not _real_starts():
        process = _context().Process(target=_call, args=(None,))
        process.start()
        process.join()


def _call(prelude: str | None) -> None:
    if prelude:
        name, function = prelude.split(":")
        getattr(importlib.import_module(name), function)()


def _as_main(
    module: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str, prelude: str | None
) -> None:
    """In the forked child: become ``python -m module args`` (after ``prelude``) and exit as it would."""
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path.insert(0, cwd)
    sys.argv = [module, *args]
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    sys.modules.pop(module, None)  # as under `python -m`: the module as __main__ only, until it imports itself
    code = 0
    try:
        _call(prelude)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class Started:
    """A started ``python -m``: ``pid``, ``poll()``, ``wait(timeout)``, ``send_signal``, ``kill``;
    after it ended, ``stdout`` and ``stderr`` (text)."""

    def __init__(
        self, module: str, args: list[str], cwd: Path, env: dict[str, str] | None, real: bool, prelude: str | None
    ):
        env = {**os.environ, **(env or {})} if env is not None else dict(os.environ)
        self._dir = tempfile.mkdtemp(prefix="cl_bench_start_")
        self._out, self._err = os.path.join(self._dir, "stdout"), os.path.join(self._dir, "stderr")
        self.args = [module, *args]
        self.returncode: int | None = None
        self.stdout = self.stderr = ""
        if real or _real_starts() or Path(cwd).resolve() != ROOT:
            with open(self._out, "w") as out, open(self._err, "w") as err:
                command = ["-c", BOOT, prelude, module] if prelude else ["-m", module]
                self._popen = subprocess.Popen(
                    [sys.executable, *command, *args],
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                )
            self._process = None
            self.pid = self._popen.pid
        else:
            self._popen = None
            self._process = _context().Process(
                target=_as_main, args=(module, list(args), env, str(cwd), *self.outputs, prelude)
            )
            self._process.start()
            self.pid = self._process.pid

    @property
    def outputs(self) -> tuple[str, str]:
        return self._out, self._err

    def poll(self) -> int | None:
        if self.returncode is None:
            if self._popen is not None:
                self.returncode = self._popen.poll()
            elif self._process.exitcode is not None:
                self.returncode = self._process.exitcode
            if self.returncode is not None:
                self._collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self._popen is not None:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        else:
            self._process.join(timeout)
            if self._process.exitcode is None:
                self.kill()
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.poll()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        (self._popen.wait() if self._popen is not None else self._process.join())
        self.poll()

    def _collect(self) -> None:
        for name, path in (("stdout", self._out), ("stderr", self._err)):
            setattr(self, name, Path(path).read_text(errors="replace"))
            os.unlink(path)
        os.rmdir(self._dir)


def start_module(
    module: str,
    *args: str,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    real: bool = False,
    prelude: str | None = None,
) -> Started:
    """Start ``python -m module args``. ``env``: variables set or changed in the test's environment;
    ``real``: a new interpreter, where its own start is what is tested; ``prelude``: a
    ``"module:function"`` called in the process before the module runs (e.g. a probe that patches)."""
    return Started(module, [str(a) for a in args], cwd, env, real, prelude)


def run_module(
    module: str,
    *args: str,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    real: bool = False,
) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)``,
    started from the preloaded server where it can be."""
    started = start_module(module, *args, cwd=cwd, env=env, real=real)
    code = started.wait(timeout)
    return subprocess.CompletedProcess(started.args, code, started.stdout, started.stderr)


def spawn(function, args: tuple = (), nprocs: int = 2, timeout: float = 300) -> None:
    """``torch.multiprocessing.spawn(function, args, nprocs)`` from the preloaded server:
    ``function(rank, *args)`` in ``nprocs`` processes at once; one that does not exit with 0 fails."""
    context = multiprocessing.get_context("spawn") if _real_starts() else _context()
    processes = [context.Process(target=function, args=(rank, *args)) for rank in range(nprocs)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    for process in processes:
        if process.exitcode is None:
            process.kill()
            process.join()
    codes = [process.exitcode for process in processes]
    assert codes == [0] * nprocs, f"{function.__name__}: exit codes {codes} (-9: still running after {timeout} s)"
