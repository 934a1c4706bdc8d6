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


def _conv_filter_gradient(choice: str, cpu: bool) -> str:
    """Resolves 'auto': the CPU kernel on a single CPU device where it builds.

    With several devices XLA partitions the step over the batch and would
    gather the whole batch onto each device for the kernel, so 'auto' keeps
    XLA's gradients there.
    """
    if choice == "auto":
        if not (cpu and jax.device_count() == 1):
            return "xla"
        try:
            cpu_kernels.load()
        except (cpu_kernels.KernelUnavailableError, OSError) as error:
            logging.warning("model.conv_filter_gradient: using XLA's: %s", error)
            return "xla"
        return "direct"
    if choice == "direct":
        if not cpu:
            raise ValueError(
                "model.conv_filter_gradient='direct' runs on the CPU only; "
                f"this backend is {jax.default_backend()!r} (use 'auto' or 'xla')."
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
    for key, cpu_choice in (
        ("max_pool_gradient", "argmax"),
        ("batch_norm_relu", "fused"),
    ):
        if fields.get(key) == "auto":
            fields[key] = cpu_choice if cpu else "xla"
    if "conv_filter_gradient" in fields:
        fields["conv_filter_gradient"] = _conv_filter_gradient(
            fields["conv_filter_gradient"], cpu
        )
    accepted = set(model_cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(fields) - accepted)
    if unknown:
        raise ValueError(
            f"model fields {unknown} are not fields of {model_cls.__name__}, "
            f"which accepts: {', '.join(sorted(accepted))}."
        )
    return model_cls(**fields)


__all__ = ["FCN", "MODELS", "Classifier", "DeepLabV3", "UNet", "create_model"]
