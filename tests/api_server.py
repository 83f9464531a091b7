"""A real ``lorasearch serve`` (uvicorn) on a free port of 127.0.0.1, for the API tests and the HTTP benchmark.

The server runs in its own process, as in production; its log goes to a file
the caller can read (e.g. to assert that no request ended in a traceback).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Sequence

import httpx

REPO = Path(__file__).resolve().parents[1]
# The CLI as a command line. Not ``python -m lorasearch.cli``: that runs cli.py as ``__main__`` and a command
# module importing ``lorasearch.cli`` at its top would load the CLI a second time, half-initialised.
CLI = [sys.executable, "-c", "import sys; sys.argv[0] = 'lorasearch'; from lorasearch.cli import main; main()"]


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiServer:
    """``lorasearch serve`` in a subprocess.

    Args:
        db: the store directory.
        log_path: where the server's stdout and stderr go.
        token_file: enables the write routes.
        max_upload_mb: upload cap in MiB.
        workers: uvicorn worker processes.
        tmp_dir: the server's TMPDIR (where uploads are spooled), so a test can check it is left empty.
        extra_args: more ``serve`` options.
    """

    def __init__(self, db: Path, log_path: Path, token_file: Path | None = None, max_upload_mb: float | None = None,
                 workers: int = 1, tmp_dir: Path | None = None, extra_args: Sequence[str] = ()) -> None:
        self.db, self.log_path, self.token_file = db, log_path, token_file
        self.max_upload_mb, self.workers, self.tmp_dir, self.extra_args = max_upload_mb, workers, tmp_dir, extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ram_dir: Path | None = None  # the RAM spool folder given to the server (with tmp_dir only)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        cmd = [*CLI, "serve", "--db", str(self.db), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers), "--log-level", "warning", *self.extra_args]
        if self.token_file is not None:
            cmd += ["--token-file", str(self.token_file)]
        if self.max_upload_mb is not None:
            cmd += ["--max-upload-mb", str(self.max_upload_mb)]
        return cmd

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # one BLAS thread per server process: the machine's cores serve requests, not one matmul
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        if self.tmp_dir is not None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(self.tmp_dir)
            # small uploads are spooled to RAM (/dev/shm): a folder of this server's own there, checked like TMPDIR
            if self.ram_dir is None and Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
                self.ram_dir = Path(tempfile.mkdtemp(prefix="lorasearch-test-ram-", dir="/dev/shm"))
            env["LORASEARCH_API_RAM_TMP"] = str(self.ram_dir) if self.ram_dir is not None else ""
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def start(self, timeout: float = 90.0, tries: int = 3) -> ApiServer:
        """Start the server and wait until ``/healthz`` answers (a port taken meanwhile is retried)."""
        for attempt in range(tries):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                             cwd=REPO)
            if self._wait_ready(timeout):
                return self
            self.stop()
            if "address already in use" not in self.log().lower() or attempt == tries - 1:
                raise RuntimeError(f"lorasearch serve did not start:\n{self.log()[-4000:]}")
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
        if self.ram_dir is not None:
            shutil.rmtree(self.ram_dir, ignore_errors=True)
            self.ram_dir = None

    def spooled(self) -> list[Path]:
        """Upload folders the server left in its temp folders (there should be none between requests)."""
        return [p for d in (self.tmp_dir, self.ram_dir) if d is not None for p in d.glob("lorasearch-upload-*")]
