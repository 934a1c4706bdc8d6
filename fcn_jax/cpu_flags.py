"""XLA:CPU flags that must be set before jax is imported (so: no jax import here).

YNNPACK convolution fusions are off by default: on the reference 2-core CPU they
made the configs/unet.py train step ~9% slower and its XLA scratch memory 36%
larger, and were neutral on wider U-Nets (see README, Performance). The flag
only concerns the CPU backend. Set FCN_JAX_KEEP_YNN_FUSIONS=1 to keep XLA's
default, or put the flag in XLA_FLAGS yourself to choose its value.
"""

import os
import sys

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def configure() -> None:
    """Adds our CPU defaults to XLA_FLAGS unless the user has chosen otherwise."""
    if "jax" in sys.modules:
        raise RuntimeError(
            "fcn_jax.cpu_flags.configure() must run before importing jax."
        )
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("FCN_JAX_KEEP_YNN_FUSIONS") == "1" or _YNN_FLAG in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}=".strip()
