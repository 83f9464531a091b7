"""A second process that sketches part of a large LoRA's modules, on the other core.

Sketching an SDXL-size LoRA is ~1,000 modules, each a few tens of microseconds
of widening and BLAS between a few microseconds of Python. Threads cannot
share that work: numpy holds the GIL through small products and a thread
that re-takes the GIL after every C call waits on the other (measured: two
threads ran 0.93× one). A process has its own GIL: the streaming reader
(``lorasearch.read_embed``) sends this helper the file's identity and, for
part of the modules, where their 16-bit factors lie in the file; the helper
reads those bytes itself (``pread``, no mmap: a file cut meanwhile gives a
short read, not SIGBUS), widens and sketches them with the same functions,
and sends back the k×k sketches (one stacked array and their names). They are
the same bits as sketched in the caller (exact casts, the same products on the
same shapes).

The helper starts in the background on first use (the caller does all the
work itself until it is ready), keeps its own Gaussian cache and exits when
its parent's pipe closes. When a job fails, the caller sketches those modules
itself; a helper that dies is replaced (at most three starts per process).
``LORASEARCH_SKETCH_HELPER=0`` turns it off; it is never used on a one-core
machine. Messages are length-prefixed pickles between this process and its
own child (no file content is ever unpickled).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any, Iterator, Sequence

import numpy as np

# (dtype, byte offset in the data section, elements, view offset in elements, shape, strides in elements)
Spec = tuple[str, int, int, int, tuple[int, ...], tuple[int, ...]]
# (module, p, q, scale, up spec, down spec)
Item = tuple[str, int, int, float, Spec, Spec]

ENV = "LORASEARCH_SKETCH_HELPER"  # "0" turns the helper off in this process and its children
_LEN = struct.Struct("<Q")
# A job is ~50 ms on an SDXL-size LoRA; a helper silent this long is stuck and is stopped
# (nothing waits forever on it, e.g. a server's request).
RESULT_TIMEOUT = 120.0


def _send(fh: IO[bytes], obj: Any) -> None:
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(_LEN.pack(len(blob)) + blob)
    fh.flush()


def _recv(fh: IO[bytes]) -> Any:
    head = fh.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError("sketch helper pipe closed")
    (n,) = _LEN.unpack(head)
    blob = fh.read(n)
    if len(blob) < n:
        raise EOFError("sketch helper pipe closed")
    return pickle.loads(blob)


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """No helper inside the block (for a caller that was given one core)."""
    old = os.environ.get(ENV)
    os.environ[ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def enabled() -> bool:
    """Whether this process may use a helper (a second core, and not turned off)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return cores() >= 2


class SketchHelper:
    """The client side: one child process, one job at a time."""

    def __init__(self) -> None:
        env = dict(os.environ)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # it is the second core
        if "torch" in sys.modules:  # the caller widens with torch's cast: so does the helper (same values)
            env["LORASEARCH_HELPER_TORCH"] = "1"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this lorasearch, however it was found
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lorasearch.sketch_helper"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, close_fds=True,
        )
        self.owner = os.getpid()  # a forked child must not talk through its parent's pipes
        self._ready = False
        self._busy = threading.Lock()
        self.broken = False
        self.cpu_seconds = 0.0  # CPU time the child spent on jobs so far (benchmarks count it)
        self.wait_seconds = 0.0  # time callers spent blocked in result() so far (benchmarks report it)

    def ready(self) -> bool:
        """Whether the child has started (never blocks)."""
        if self._ready or self.broken:
            return self._ready and not self.broken
        out = self._proc.stdout
        assert out is not None
        try:
            if not select.select([out], [], [], 0)[0]:
                return False
            self._ready = _recv(out) == "ready"
        except (OSError, EOFError, pickle.UnpicklingError):
            self._ready = False
        if not self._ready:
            self.close()
        return self._ready

    def acquire(self) -> bool:
        """Take the helper for one job (False: not ready, broken, or busy with another thread's)."""
        return self.ready() and self._busy.acquire(blocking=False)

    def release(self) -> None:
        """Give the helper back without a job."""
        self._busy.release()

    def submit(self, path: str, identity: tuple[int, ...], data_start: int, family: str, k: int,
               items: Sequence[Item]) -> bool:
        """Send one job (the caller holds ``acquire``); its answer is read by ``result``.

        Returns:
            False when the helper is gone (it is then closed and released: no ``result``).
        """
        try:
            assert self._proc.stdin is not None
            _send(self._proc.stdin, ("sketch", path, identity, data_start, family, k, list(items)))
            return True
        except (OSError, ValueError):
            self.close()
            self._busy.release()
            return False

    def result(self) -> dict[str, np.ndarray]:
        """The sketches of the submitted job; releases the helper.

        Raises:
            RuntimeError: the job failed (the helper stays), or the helper died or went
                silent for ``RESULT_TIMEOUT`` seconds (it is stopped; a later ``get`` starts another).
        """
        start = time.perf_counter()
        try:
            assert self._proc.stdout is not None
            if not select.select([self._proc.stdout], [], [], RESULT_TIMEOUT)[0]:
                raise OSError(f"no answer in {RESULT_TIMEOUT:.0f} s")
            status, payload, cpu = _recv(self._proc.stdout)
            self.cpu_seconds += cpu
            self.wait_seconds += time.perf_counter() - start
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
            self.close()
            raise RuntimeError(f"sketch helper failed: {exc}") from None
        finally:
            self._busy.release()
        if status != "ok":
            raise RuntimeError(f"sketch helper: {payload}")
        try:
            names, stacked = payload
            return dict(zip(names, stacked, strict=True))
        except (TypeError, ValueError) as exc:
            raise RuntimeError(f"sketch helper: malformed answer ({exc})") from None

    def clear_caches(self) -> None:
        """Empty the helper's Gaussian cache too (benchmarks of a cold worker)."""
        if not self.acquire():
            return
        try:
            assert self._proc.stdin is not None and self._proc.stdout is not None
            _send(self._proc.stdin, ("clear",))
            _recv(self._proc.stdout)
        except (OSError, EOFError, pickle.UnpicklingError):
            self.close()
        finally:
            self._busy.release()

    def close(self) -> None:
        """Stop the child (idempotent); this helper is not used again."""
        self.broken = True
        if self.owner != os.getpid():  # a forked copy: the child is the parent's to stop
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for fh in (self._proc.stdin, self._proc.stdout):
            if fh is not None:
                with contextlib.suppress(OSError):
                    fh.close()


_helper: SketchHelper | None = None
_starts = 0
_MAX_STARTS = 3  # a helper that keeps failing is not started again in this process
_start_lock = threading.Lock()


def get() -> SketchHelper | None:
    """This process's helper when it is ready and free (the caller then holds it).

    Starts one in the background when there is none (or the last one failed), and
    returns None until it is ready.
    """
    global _helper, _starts
    if not enabled():
        return None
    helper = _helper
    if helper is not None and helper.owner != os.getpid():  # forked: the helper is the parent's
        _helper, _starts, helper = None, 0, None
    if helper is not None and not helper.broken:
        return helper if helper.acquire() else None
    if _starts >= _MAX_STARTS:
        return None
    with _start_lock:
        if _helper is None or _helper.broken:
            _starts += 1
            try:
                _helper = SketchHelper()
            except OSError:
                _starts = _MAX_STARTS
                return None
            atexit.register(_helper.close)
    return None


def wait_ready(timeout: float = 60.0) -> bool:
    """Start the helper if needed and wait until it is ready (benchmarks: time its steady state).

    Returns:
        whether a helper is ready.
    """
    helper = get()
    if helper is not None:
        helper.release()
        return True
    deadline = time.monotonic() + timeout
    while _helper is not None and not _helper.broken and time.monotonic() < deadline:
        if _helper.ready():
            return True
        time.sleep(0.05)
    return False


def clear_caches() -> None:
    """Empty the helper's Gaussian cache (benchmarks of a cold worker); nothing without a helper."""
    if _helper is not None and not _helper.broken and _helper.owner == os.getpid():
        _helper.clear_caches()


# -- the child ------------------------------------------------------------------------------------

def _pread_exact(fd: int, buf: np.ndarray, offset: int) -> None:
    from lorasearch.formats.safetensors_file import preadv_into

    view = memoryview(buf).cast("B")
    got = preadv_into(fd, view, offset)
    if got < len(view):
        raise OSError(f"short read at byte {offset + got} (the file changed?)")


def _sketch_job(path: str, identity: tuple[int, ...], data_start: int, family: str, k: int,
                items: list[Item], scratch: list[np.ndarray]) -> dict[str, np.ndarray]:
    from lorasearch.delta import Factored
    from lorasearch.formats.safetensors_file import SpanCaster
    from lorasearch.sketch import gaussian, module_sketch

    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != tuple(identity):
            raise OSError("the file changed after the caller opened it")

        casts = [SpanCaster(), SpanCaster()]

        def widened(start: int, n: int, dtype: str, i: int) -> np.ndarray:
            """Elements ``[start, start + n)`` of the data section (bytes / 2) as float32, in scratch ``i``."""
            if scratch[2 * i].size < n:
                scratch[2 * i] = np.empty(max(n, 1 << 20), np.uint16)
                scratch[2 * i + 1] = np.empty(max(n, 1 << 20), np.float32)
            codes, out = scratch[2 * i], scratch[2 * i + 1]
            _pread_exact(fd, codes[:n], data_start + 2 * start)
            casts[i].widen(codes, 0, n, out, dtype)
            return out

        def view(spec: Spec, out: np.ndarray, origin: int) -> np.ndarray:
            _, start, _, offset, shape, strides = spec
            return np.ndarray(shape, dtype=np.float32, buffer=out, offset=4 * (start // 2 - origin + offset),
                              strides=tuple(4 * s for s in strides))

        res: dict[str, np.ndarray] = {}
        for name, p, q, scale, up, down in items:
            lo, hi = min(up[1], down[1]) // 2, max(up[1] // 2 + up[2], down[1] // 2 + down[2])
            if up[0] == down[0] and hi - lo == up[2] + down[2]:  # side by side in the file: one read, one cast
                out = widened(lo, hi - lo, up[0], 0)
                d = Factored(view(up, out, lo), view(down, out, lo), scale)
            else:
                d = Factored(view(up, widened(up[1] // 2, up[2], up[0], 0), up[1] // 2),
                             view(down, widened(down[1] // 2, down[2], down[0], 1), down[1] // 2), scale)
            res[name] = module_sketch(d, gaussian(family, name, (p, q), "L", p, k),
                                      gaussian(family, name, (p, q), "R", q, k))
        return res
    finally:
        os.close(fd)


def main() -> None:
    """The child's loop: answer jobs on stdin until it closes."""
    if os.environ.get("LORASEARCH_HELPER_TORCH") == "1":
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:
            pass
    from lorasearch import sketch

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the pipe
    scratch = [np.empty(0, np.uint16), np.empty(0, np.float32), np.empty(0, np.uint16), np.empty(0, np.float32)]
    _send(out, "ready")
    while True:
        try:
            msg = _recv(inp)
        except EOFError:
            return
        if msg[0] == "clear":
            sketch.clear_caches()
            _send(out, ("ok", None, 0.0))
            continue
        cpu = time.process_time()
        try:
            res = _sketch_job(*msg[1:], scratch)
        except Exception as exc:  # noqa: BLE001 - the caller sketches these modules itself
            _send(out, ("error", f"{exc.__class__.__name__}: {exc}", time.process_time() - cpu))
            continue
        # one stacked array, not a dict of small ones: a tenth of the pickling on both sides
        stacked = np.stack(list(res.values())) if res else np.empty((0, 0, 0), np.float32)
        _send(out, ("ok", (list(res), stacked), time.process_time() - cpu))


if __name__ == "__main__":
    main()
