"""CPU kernels compiled on first use and called from XLA through its FFI.

`conv` computes a stride-1 2D convolution without packing image patches
(see conv.cc) and `conv_filter_gradient` its filter gradient (see
conv_filter_gradient.cc), both faster than XLA:CPU's own lowering with 16-128
channels; `flipped_transposed_kernel` prepares the kernel of the input
gradient. `channel_moments` and `relu_batch_norm_gradient_sums` take the
per-channel sums of training-mode BatchNorm in one read of their inputs (see
batch_norm_sums.cc). The library is built with the machine's C++ compiler ($CXX, else
g++ or c++) for this CPU (-march=native; $FCN_JAX_KERNEL_MARCH names another
target, e.g. haswell for AVX2 machines) into a cache directory
($FCN_JAX_KERNEL_CACHE, else ~/.cache/fcn_jax/cpu_kernels), keyed by the
sources, the flags, the compiler, jaxlib and the CPU, so each machine builds it
once (about 2 s).
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("conv.cc", "conv_filter_gradient.cc", "batch_norm_sums.cc")
)
HEADERS = (Path(__file__).with_name("parallel_chunks.h"),)
CACHE_ENV = "FCN_JAX_KERNEL_CACHE"
MARCH_ENV = "FCN_JAX_KERNEL_MARCH"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
_CONV_TARGET = "fcn_jax_conv"
_TARGET = "fcn_jax_conv_filter_gradient"
_FLIP_TARGET = "fcn_jax_flipped_transposed_kernel"
_MOMENTS_TARGET = "fcn_jax_channel_moments"
_GRADIENT_SUMS_TARGET = "fcn_jax_relu_batch_norm_gradient_sums"
# The kernels read channels in whole registers of up to 16 float32 lanes.
CHANNEL_MULTIPLE = 16


class KernelUnavailableError(RuntimeError):
    """The CPU kernels cannot be built or loaded on this machine."""


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    raise KernelUnavailableError(
        "no C++ compiler found ($CXX, g++ or c++) to build the CPU kernels."
    )


def _cpu_features() -> str:
    """The CPU's feature flags, which -march=native compiles for."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path() -> Path:
    """Where this machine's build of the library lives (built if missing)."""
    compiler = _compiler()
    flags = (*FLAGS, f"-march={os.environ.get(MARCH_ENV) or 'native'}")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        "\n".join(
            [
                *(source.read_text() for source in SOURCES + HEADERS),
                " ".join(flags),
                version,
                jax.__version__,
                platform.machine(),
                _cpu_features(),
            ]
        ).encode()
    ).hexdigest()[:16]
    cache = Path(
        os.environ.get(CACHE_ENV) or Path.home() / ".cache/fcn_jax/cpu_kernels"
    )
    path = cache / f"libfcn_jax_cpu_kernels_{key}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed, so concurrent processes never
    # load a half-written library.
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    command = [
        compiler,
        *flags,
        f"-I{jax.ffi.include_dir()}",
        "-o",
        str(partial),
        *map(str, SOURCES),
        "-lpthread",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise KernelUnavailableError(
            f"building {', '.join(source.name for source in SOURCES)} failed ({' '.join(command)}):\n"
            f"{result.stderr[-2000:]}"
        )
    os.replace(partial, path)
    return path


@functools.cache
def load() -> None:
    """Builds (once per machine) and registers the kernels with XLA:CPU."""
    library = ctypes.cdll.LoadLibrary(str(library_path()))
    jax.ffi.register_ffi_target(
        _TARGET, jax.ffi.pycapsule(library.FcnJaxConvFilterGradient), platform="cpu"
    )
    for target, symbol in (
        (_CONV_TARGET, library.FcnJaxConv),
        (_FLIP_TARGET, library.FcnJaxFlippedTransposedKernel),
        (_MOMENTS_TARGET, library.FcnJaxChannelMoments),
        (_GRADIENT_SUMS_TARGET, library.FcnJaxReluBatchNormGradientSums),
    ):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")


def _parts() -> int:
    """How many fixed parts the kernels split a sum into: one per core this
    process may use. The parts run on XLA's thread pool and are added in
    order, so a result depends on this count, never on scheduling."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def conv(
    x: jax.Array,
    kernel: jax.Array,
    pads: tuple[int, int],
    output_size: tuple[int, int],
) -> jax.Array:
    """A stride-1 2D conv, channels last:

    y[n, h, w, o] = sum_{a,b,i} x[n, h + a - pads[0], w + b - pads[1], i] kernel[a, b, i, o]

    Args:
      x: [N, Hx, Wx, Ci] float32.
      kernel: [KH, KW, Ci, Co] float32, Co a multiple of 16.
      pads: the low (top, left) zero padding of x.
      output_size: (Hy, Wy); the high padding is what it takes (x's rows and
        columns past Hy + KH - 1 - pads[0] are not read).

    Returns:
      y [N, Hy, Wy, Co] float32.
    """
    load()
    out = jax.ShapeDtypeStruct(
        (x.shape[0], *output_size, kernel.shape[-1]), jnp.float32
    )
    return jax.ffi.ffi_call(_CONV_TARGET, out)(
        x, kernel, pad_h=np.int64(pads[0]), pad_w=np.int64(pads[1])
    )


def conv_filter_gradient(
    x: jax.Array, g: jax.Array, kernel_size: tuple[int, int], pads: tuple[int, int]
) -> jax.Array:
    """The filter gradient of a stride-1 2D conv, channels last:

    dw[a, b, i, o] = sum_{n,h,w} x[n, h + a - pads[0], w + b - pads[1], i] g[n, h, w, o]

    Args:
      x: conv input [N, Hx, Wx, Ci], float32.
      g: cotangent of the stride-1 conv output [N, Hg, Wg, Co], float32, Co a
        multiple of 16.
      kernel_size: (KH, KW).
      pads: the low (top, left) zero padding of x.

    Returns:
      The filter gradient [KH, KW, Ci, Co], float32.
    """
    load()
    out = jax.ShapeDtypeStruct((*kernel_size, x.shape[-1], g.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out)(
        x,
        g,
        pad_h=np.int64(pads[0]),
        pad_w=np.int64(pads[1]),
        parts=np.int64(_parts()),
    )


def flipped_transposed_kernel(kernel: jax.Array) -> jax.Array:
    """kernel [KH, KW, Ci, Co] float32 -> [KH, KW, Co, Ci], reversed in both
    spatial axes: the kernel whose stride-1 conv of an output cotangent is the
    input gradient. `jnp.flip(jnp.swapaxes(kernel, 2, 3), (0, 1))`, copied in
    tiles (XLA:CPU's own copy of a [3, 3, 1024, 1024] kernel takes ~70 ms)."""
    load()
    k_h, k_w, ci, co = kernel.shape
    out = jax.ShapeDtypeStruct((k_h, k_w, co, ci), jnp.float32)
    return jax.ffi.ffi_call(_FLIP_TARGET, out)(kernel)


def channel_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., C] float32, C a multiple of CHANNEL_MULTIPLE -> (sum of x, sum
    of x**2) over all but the last axis, each [C] float32, accumulated in
    float64 blocks of 256 pixels."""
    load()
    out = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
    return jax.ffi.ffi_call(_MOMENTS_TARGET, (out, out))(x, parts=np.int64(_parts()))


def relu_batch_norm_gradient_sums(
    x: jax.Array,
    dy: jax.Array,
    mean: jax.Array,
    inv: jax.Array,
    gain: jax.Array,
    bias: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The two per-channel sums of the BatchNorm+ReLU backward pass.

    With x_hat = (x - mean) * inv and g = dy where the ReLU passed, i.e. where
    (x - mean) * gain + bias > 0, returns (sum g, sum g * x_hat) over all but
    the last axis, each [C] float32.

    Args:
      x: the BatchNorm input [..., C] float32, C a multiple of CHANNEL_MULTIPLE.
      dy: the cotangent of the ReLU output, same shape.
      mean, inv: the batch mean and 1/sqrt(var + eps), [C] float32.
      gain, bias: the affine map after centring, inv * scale and the BatchNorm
        bias, [C] float32, as the forward pass applied them.
    """
    load()
    out = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
    return jax.ffi.ffi_call(_GRADIENT_SUMS_TARGET, (out, out))(
        x, dy, mean, inv, gain, bias, parts=np.int64(_parts())
    )
