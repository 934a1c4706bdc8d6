"""Fully convolutional models and the registry that builds them from a config."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from fcn_jax import cpu_kernels
from fcn_jax.models.classifier import Classifier
from fcn_jax.models.deeplab import DeepLabV3
from fcn_jax.models.fcn import FCN
from fcn_jax.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "fcn": FCN,
    "deeplabv3": DeepLabV3,
    "classifier": Classifier,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _to_dict(model_config: Any) -> dict[str, Any]:
    if hasattr(model_config, "to_dict"):
        return dict(model_config.to_dict())
    return dict(model_config)


def _dtype(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value not in DTYPES:
        raise ValueError(f"model.{key}={value!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[value]


def _cpu_kernel_choice(
    key: str, choice: str, cpu: bool, kernel: str, cpu_else: str
) -> str:
    """Resolves `model.<key>`, whose choice `kernel` runs on the CPU kernels.

    'auto' is `kernel` on a single CPU device where the kernels build,
    `cpu_else` on other CPU set-ups and 'xla' on accelerators. With several
    devices XLA partitions the step over the batch and would gather the whole
    batch onto each device for a kernel, so 'auto' keeps XLA's ops there.
    """
    if choice == "auto":
        if not cpu:
            return "xla"
        if jax.device_count() != 1:
            return cpu_else
        try:
            cpu_kernels.load()
        except (cpu_kernels.KernelUnavailableError, OSError) as error:
            logging.warning("model.%s: using %r: %s", key, cpu_else, error)
            return cpu_else
        return kernel
    if choice == kernel:
        if not cpu:
            raise ValueError(
                f"model.{key}={kernel!r} runs on the CPU only; this backend is "
                f"{jax.default_backend()!r} (use 'auto' or 'xla')."
            )
        cpu_kernels.load()  # Raises, with the compiler's message, if it fails.
    return choice


def create_model(model_config: Any) -> nn.Module:
    """Builds the model named by `model_config.name` from the config's other fields.

    Args:
      model_config: a ConfigDict (or mapping) such as `config.model`; dtypes are
        given by name ('float32', 'bfloat16', 'float16').

    Raises:
      ValueError: for an unknown model name, dtype, or a field the model lacks.
    """
    fields = _to_dict(model_config)
    name = fields.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}.")
    model_cls = MODELS[name]
    for key in ("dtype", "param_dtype"):
        if key in fields:
            fields[key] = _dtype(key, fields[key])
    # XLA's select-and-scatter and BatchNorm gradients are slow only on CPU;
    # accelerators keep them.
    cpu = jax.default_backend() == "cpu"
    for key, cpu_choice, accelerator_choice in (
        ("max_pool_gradient", "argmax", "xla"),
        ("skip_conv", "split", "concat"),
    ):
        if fields.get(key) == "auto":
            fields[key] = cpu_choice if cpu else accelerator_choice
    for key, kernel, cpu_else in (
        ("batch_norm_relu", "kernel", "fused"),
        ("conv_filter_gradient", "direct", "xla"),
        ("conv_forward", "direct", "xla"),
    ):
        if key in fields:
            fields[key] = _cpu_kernel_choice(key, fields[key], cpu, kernel, cpu_else)
    accepted = set(model_cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(fields) - accepted)
    if unknown:
        raise ValueError(
            f"model fields {unknown} are not fields of {model_cls.__name__}, "
            f"which accepts: {', '.join(sorted(accepted))}."
        )
    return model_cls(**fields)


__all__ = ["FCN", "MODELS", "Classifier", "DeepLabV3", "UNet", "create_model"]
