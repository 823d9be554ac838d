"""The fused quantize kernels: TensorFlow CPU ops built from ``quantize_op.cc`` on first use.

:mod:`nics_fix.quant` calls them for round-to-nearest with one scale per tensor
or per channel of the last axis (2..24 bits, CPU, outside XLA): the auto
scale's reduction, the quantize and the clip test then take one op and one or
two passes over memory instead of about twenty TensorFlow ops, written into
the input's buffer where no other op reads it; a second op fuses
BatchNormalization's exact evaluation (float64 ``x * a + c``, quantized); a
third keeps a weight's quantized copy for evaluation
(:mod:`nics_fix.weight_cache`), refreshing it in the same op when it is stale.
Their values are those of the plain ops bit for bit (``tests/test_kernels.py``,
``benchmarks/quant_exactness.py``).

The op is compiled once per machine and TensorFlow install, with the C++
compiler found as ``$CXX``, ``g++`` or ``c++`` and TensorFlow's own flags
(about 10 s), into ``$NICS_FIX_KERNEL_CACHE`` (default
``~/.cache/nics_fix/kernels``); processes that start together wait for one
build. The library checks the CPU at run time (AVX2 or not), so a cache shared
by the nodes of a cluster is safe.

Anything that goes wrong (no compiler, a failed build or load, a self-check
that does not match the plain ops) leaves ``quantize_op()`` returning None
with the reason in :func:`status`, logged once, and everything runs on the
plain TensorFlow ops, with the same values. ``NICS_FIX_NATIVE=0`` turns the
kernel off (also the way to export a SavedModel graph of standard ops only).

The quantize op has two forms: one scale per tensor, and one scale per channel
of the last axis (``per_channel=True``, a scale vector as long as that axis).

>>> from nics_fix import kernels
>>> kernels.status()                          # doctest: +SKIP
'loaded /root/.cache/nics_fix/kernels/quantize_op-3f9c2a41d0e7b5c8.so'
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import tensorflow as tf

from nics_fix.log import logger

SOURCE = Path(__file__).with_name("quantize_op.cc")
OP_NAMES = ("NicsFixFixedPointQuantize", "NicsFixScaleShiftQuantize", "NicsFixCachedQuantize")
SWITCH_ENV = "NICS_FIX_NATIVE"
CACHE_ENV = "NICS_FIX_KERNEL_CACHE"
BUILD_TIMEOUT_S = 600

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    """Where built libraries are kept: ``$NICS_FIX_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/nics_fix/kernels``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nics_fix" / "kernels"


def build_flags() -> list[str]:
    # -ffp-contract=off: a fused multiply-add would skip a rounding the plain ops make.
    return ["-shared", "-fPIC", "-O3", "-ffp-contract=off", "-w",
            *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def library_path() -> Path:
    """The library for this source, TensorFlow build and flags (a new name when any changes)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(f"{tf.__version__} {tf.__git_version__} {' '.join(build_flags())}".encode())
    return cache_dir() / f"quantize_op-{key.hexdigest()[:16]}.so"


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def quantize_op():
    """The quantize op's Python function (``nics_fix_fixed_point_quantize``), or None: see :func:`status`."""
    library = _library()
    return None if library is None else library.nics_fix_fixed_point_quantize


def scale_shift_op():
    """``quantize(x * a + c)`` per channel (BatchNormalization's evaluation), or None: see :func:`status`."""
    library = _library()
    return None if library is None else library.nics_fix_scale_shift_quantize


def cached_quantize_op():
    """A weight's quantized copy for evaluation, refreshed in the same op when stale (see
    :mod:`nics_fix.weight_cache`), or None: see :func:`status`."""
    library = _library()
    return None if library is None else library.nics_fix_cached_quantize


def _library():
    if getattr(_off, "depth", 0):
        return None
    with _lock:
        if "library" not in _state:
            _state["library"], _state["status"] = _load()
            log = logger.info if _state["library"] is not None or not enabled() else logger.warning
            log("fused quantize kernel: %s", _state["status"])
        return _state["library"]


_off = threading.local()  # per thread: models are traced in the thread that calls them


@contextlib.contextmanager
def disabled():
    """Models traced inside this block (in this thread) use the plain TensorFlow ops (for side-by-side timing).

    >>> with kernels.disabled():                  # doctest: +SKIP
    ...     model.train_on_batch(x, y)            # traced here: plain ops from now on
    """
    _off.depth = getattr(_off, "depth", 0) + 1
    try:
        yield
    finally:
        _off.depth -= 1


def status() -> str:
    """Why the kernel is used or not, in one line (loads it first if that was not tried yet)."""
    quantize_op()
    return _state["status"]


def _load():
    """``(op or None, status line)``; never raises: any failure means the plain ops."""
    if not enabled():
        return None, f"off ({SWITCH_ENV}=0): plain TensorFlow ops"
    path = None
    try:
        path = library_path()
        built = False
        if not path.exists():
            compiler = _compiler()
            if compiler is None:
                return None, "no C++ compiler (g++) to build it: plain TensorFlow ops, same values, slower"
            _build(compiler, path)
            built = True
        try:
            library = _load_library(path)
        except Exception:  # noqa: BLE001 - a damaged or foreign cached library: build it again, once
            if built:
                raise
            logger.warning("fused quantize kernel: %s does not load; building it again", path)
            path.unlink(missing_ok=True)
            _build(_compiler() or "g++", path)
            library = _load_library(path)
        mismatch = _checked(library)
    except _BuildError as err:
        return None, f"{err}: plain TensorFlow ops, same values, slower"
    except Exception as err:  # noqa: BLE001 - whatever fails, quantizing must go on, on the plain ops
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        where = f" {path}" if path is not None else ""
        return None, f"could not load{where}: {type(err).__name__}: {first_line}: plain TensorFlow ops"
    if mismatch:
        return None, f"{path} does not match the plain ops ({mismatch}): not used"
    return library, f"loaded {path}"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _load_library(path: Path):
    """The loaded ops (raises when the library does not load)."""
    with tf.init_scope():
        library = tf.load_op_library(str(path))
        for name in OP_NAMES:
            if name not in _no_gradient_registered:
                tf.no_gradient(name)  # gradients are the straight-through ones of nics_fix.quant
                _no_gradient_registered.add(name)
        return library


def _checked(library) -> str:
    """What the ops' self-check found: '' when they match the plain ops. A check that
    cannot run (whatever the reason) counts as a mismatch: the library is not used,
    but it is not deleted either (it loaded; the cause may be the caller's context)."""
    try:
        with tf.init_scope():  # eagerly, even when first asked for while a model is traced
            return (_self_check(library.nics_fix_fixed_point_quantize)
                    or _self_check_scale_shift(library.nics_fix_scale_shift_quantize)
                    or _self_check_cached(library.nics_fix_cached_quantize, library.nics_fix_fixed_point_quantize))
    except Exception as err:  # noqa: BLE001
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        return f"the self-check failed: {type(err).__name__}: {first_line}"


_no_gradient_registered: set = set()


class _BuildError(RuntimeError):
    pass


def _build(compiler: str, path: Path) -> None:
    """Compile to ``path`` once: one process builds, the others wait on the lock and load its result."""
    from nics_fix.saving import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            import fcntl

            lock = stack.enter_context(open(path.with_suffix(".lock"), "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):  # not POSIX, no locks on this filesystem: at worst two processes build
            pass
        if path.exists():
            return
        logger.warning("building the fused quantize kernel into %s (once per machine, about 10 s)", path)
        log_path = path.with_suffix(".log")

        def compile_to(tmp):
            command = [compiler, str(SOURCE), "-o", str(tmp), *build_flags()]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            except FileNotFoundError:
                raise _BuildError(f"building {path.name} failed ({compiler} not found)") from None
            except (OSError, subprocess.TimeoutExpired) as err:
                raise _BuildError(f"building {path.name} failed ({err})") from None
            if done.returncode != 0:
                log_path.write_text(" ".join(command) + "\n" + done.stdout + done.stderr)
                raise _BuildError(f"building {path.name} failed (exit {done.returncode}, log: {log_path})")
            with open(tmp, "rb") as handle:  # on disk before the rename makes it visible to others
                os.fsync(handle.fileno())

        atomic_write(path, compile_to)


def _self_check(op) -> str:
    """Compare the op with the plain ops on the cases that are easy to get wrong; '' if all match."""
    from nics_fix import quant

    x = tf.constant(np.float32([0.0, -0.0, 0.5, 1.5, -2.5, 2.5, 0.3, -0.3, 1e-40, 3.0e38, -7.75, 127.0, -129.0,
                                np.nan, np.inf, -np.inf] + list(np.linspace(-9, 9, 37))))
    for bit_width in (2, 8, 24):
        for scale in (-3, 0, 4, 200):
            want = quant._plain_quantize(x, quant._Format(bit_width, scale), "nearest")
            got = op(x, scale, bit_width=bit_width, auto_scale=False)[0]
            if not _same_bits(got.numpy(), want.numpy()):
                return f"{bit_width} bits, scale {scale}"
        for part in (x[:13], x, x[13:16]):  # finite only; with NaN and Inf; no finite value
            fmt, inside = quant._auto_format(part, bit_width)
            got, scale, all_inside = op(part, 0, bit_width=bit_width, auto_scale=True)
            if (int(scale) != int(fmt.scale) or bool(all_inside) != bool(inside)
                    or not _same_bits(got.numpy(), quant._plain_quantize(part, fmt, "nearest").numpy())):
                return f"auto scale at {bit_width} bits"
        rows = tf.reshape(x[:52], (4, 13)) * tf.constant(np.float32(2.0) ** np.arange(-6, 7), tf.float32)
        fmt, inside, scales = quant._grouped_auto_format(rows, bit_width, quant.ScaleGroups(1, 13))
        got, used, all_inside = op(rows, tf.zeros([13], tf.int32), bit_width=bit_width, auto_scale=True,
                                   per_channel=True)
        if (not np.array_equal(used.numpy(), scales.numpy().reshape(-1)) or bool(all_inside) != bool(inside)
                or not _same_bits(got.numpy(), quant._plain_quantize(rows, fmt, "nearest").numpy())):
            return f"per-channel scales at {bit_width} bits"
    # In place (the input's buffer becomes the output, as for an activation in a
    # graph), with the guess right and wrong: one trace, two calls.
    in_place = tf.function(lambda v, s: op(tf.raw_ops.DeepCopy(x=v), s, bit_width=8, auto_scale=True)[0])
    fmt, _ = quant._auto_format(x, 8)
    for guess in (int(fmt.scale), int(fmt.scale) - 1):
        if not _same_bits(in_place(x, tf.constant(guess)).numpy(), quant._plain_quantize(x, fmt, "nearest").numpy()):
            return "auto scale in place"
    return ""


def _self_check_scale_shift(op) -> str:
    """The scale-and-shift op against the plain float64 ops; '' if it matches."""
    from nics_fix import quant

    # 11 channels: the vector lanes and the scalar tail; NaN, Inf, -0 and a float32 overflow of t
    values = np.float32([0.5, -1.25, 3.0, -0.0, 7.5, 1e-3, 250.0, -0.3, 2.0, np.nan, np.inf, 3e38,
                         -2.5, 0.75, 1.5, -9.0, 0.1, 4.0, -0.6, 12.0, 0.2, -1.0])
    x = tf.constant(values.reshape(2, 11))
    a = tf.constant(np.float32([0.75, -1.5, 3.0, 1.0, 0.5, 2.0, -0.25, 1.25, 8.0, 1.0, 1.0]))
    c = tf.constant(np.float32([0.125, 2.0, -0.5, 0.0, 1.0, -3.0, 0.5, 0.25, -1.0, 0.0, 2.0]))
    t = tf.cast(x, tf.float64) * tf.cast(a, tf.float64) + tf.cast(c, tf.float64)
    for bit_width in (2, 8, 24):
        for given in (None, -2, 5):
            scale = quant.auto_scale(t) if given is None else tf.constant(given)
            want = tf.cast(quant._quantize(t, quant._Format(bit_width, scale), "nearest"), tf.float32)
            got, used, _ = op(x, a, c, 0 if given is None else given, bit_width=bit_width,
                              auto_scale=given is None)
            if int(used) != int(scale) or not _same_bits(got.numpy(), want.numpy()):
                return f"scale and shift at {bit_width} bits"
    return ""


def _self_check_cached(op, quantize) -> str:
    """The cached-copy op: a stale copy is recomputed as the quantize op computes it (auto,
    given and constant scales), stored with its scales, and a current one is returned as it is."""
    from tensorflow.python.ops.resource_variable_ops import ResourceVariable

    # Plain resource variables: tf.Variable would follow a distribution strategy's
    # scope (when the kernel is first loaded inside one) and have no single handle.
    w = ResourceVariable(np.float32([[0.3, -2.5, 7.75], [1e-3, -0.0, 3.0], [np.nan, 0.5, -6.0]]))
    copy, current = ResourceVariable(tf.zeros([3, 3])), ResourceVariable(False)
    for kwargs, stored in (({"auto_scale": True}, 0), ({"auto_scale": False}, 1),
                           ({"auto_scale": False, "use_constant": True, "constant_scale": -1}, 5),
                           ({"auto_scale": True, "per_channel": True}, [[0, 0, 0]])):
        scale = ResourceVariable(tf.constant(stored, tf.int32))
        current.assign(False)
        per_channel = kwargs.get("per_channel", False)
        given = kwargs.get("constant_scale", tf.reshape(scale, [-1]) if per_channel else scale)
        want, want_scale, _ = quantize(w, given, bit_width=6, auto_scale=kwargs["auto_scale"],
                                       per_channel=per_channel)
        got = op(w.handle, copy.handle, current.handle, scale.handle, bit_width=6, **kwargs)
        stale_w = w.read_value()
        w.assign(w * 2.0)  # the copy stays what it was until current is false
        again = op(w.handle, copy.handle, current.handle, scale.handle, bit_width=6, **kwargs)
        w.assign(stale_w)
        want_stored = np.broadcast_to(np.reshape(want_scale.numpy(), (-1,)), (np.size(stored),))
        if (not _same_bits(got.numpy(), want.numpy()) or not _same_bits(again.numpy(), want.numpy())
                or not bool(current.numpy()) or not _same_bits(copy.numpy(), want.numpy())
                or not np.array_equal(scale.numpy().reshape(-1), want_stored)):
            return f"cached copy with {kwargs}"
    return ""


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical, -0 included; any NaN equals any NaN (payloads are not part of the format)."""
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.int32), b[~nan].view(np.int32)))
