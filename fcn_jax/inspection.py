"""What `scripts/inspect_model.py` prints: layer table, receptive fields,
checkerboard analysis, effective receptive field and translation equivariance
of the model a config builds, at initialisation or from a workdir's checkpoint."""

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fcn_jax import evaluate, experiment, models
from fcn_jax.analysis import checkerboard, equivariance, erf, layer_table, table_text
from fcn_jax.analysis.receptive_field import Field
from fcn_jax.data import transforms

SECTIONS = ("table", "checkerboard", "erf", "equivariance")


def input_shape_from(
    config: ml_collections.ConfigDict, spatial: Sequence[int]
) -> tuple:
    """[1, *spatial, C]; `spatial` empty means the config's square training crop."""
    spatial = tuple(spatial) or (config.data.crop_size,) * 2
    return (1, *spatial, len(config.data.mean))


def load_variables(
    config: ml_collections.ConfigDict,
    input_shape: Sequence[int],
    workdir: str | None = None,
    *,
    step: int | None = None,
    best: bool = False,
) -> tuple[Any, dict, str]:
    """(model, variables, where they came from): a checkpoint of `workdir` when
    given, else the initialisation of `config.train.seed`."""
    if workdir:
        restored, step = evaluate.restore_experiment(
            config, workdir, step=step, best=best
        )
        state = restored.state
        variables = {"params": state.params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        variables = jax.device_get(variables)
        return restored.model, variables, f"checkpoint step {step} of {workdir}"
    model = models.create_model(config.model)
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.key(config.train.seed), jnp.zeros(input_shape))
    return model, variables, f"initialisation (seed {config.train.seed})"


def table_section(
    model, variables, input_shape: Sequence[int], table: layer_table.LayerTable
) -> str:
    """The layer table with its checked totals, valid sizes and ASPP fields."""
    xla = layer_table.xla_forward_flops(model, variables, input_shape)
    parts = [table_text.format_rows(table), "", table_text.format_totals(table, xla)]
    for extra in (
        table_text.format_valid_sizes(model, input_shape[1]),
        table_text.format_aspp(table),
    ):
        if extra:
            parts += ["", extra]
    return "\n".join(parts)


def checkerboard_section(model, input_shape: Sequence[int], output_dir: str) -> str:
    layers = checkerboard.checkerboard_report(model, input_shape)
    lines = [checkerboard.format_report(layers)]
    rank = len(input_shape) - 2
    for layer in layers:
        pattern = checkerboard.empirical_pattern(
            layer.kernel_size, layer.stride, layer.padding, layer.output_padding, rank
        )
        path = os.path.join(
            output_dir, f"checkerboard_{layer.name.replace('/', '.')}.png"
        )
        checkerboard.write_pattern_png(pattern.tile, path)
        lines.append(f"  pattern of {layer.name}: {path}")
    return "\n".join(lines)


def real_images(config: ml_collections.ConfigDict, count: int, spatial) -> np.ndarray:
    """`count` normalised validation images [N, *spatial, C], centre-cropped."""
    source = experiment.data_source(config, config.data.eval_split)
    normalize = transforms.Normalize(tuple(config.data.mean), tuple(config.data.std))
    images = []
    for i in range(min(count, len(source))):
        image = normalize.map(source[i])["image"]
        index = tuple(
            slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(image.shape, spatial)
        )
        if any(n < s for n, s in zip(image.shape, spatial)):
            raise ValueError(
                f"Image {i} of {config.data.name} is {image.shape[:-1]}, smaller "
                f"than the requested input {tuple(spatial)}."
            )
        images.append(image[index])
    return np.stack(images)


def total_stride(table: layer_table.LayerTable) -> int:
    """The largest jump of any layer: the stride an aligned shift must respect."""
    return max(int(max(row.field.jump)) for row in table.rows)


def erf_section(
    model, variables, inputs: np.ndarray, field: Field, path: str, label: str
) -> str:
    """ERF over `inputs` [N, *S, C]: radii, Gaussian fit, support, PNG."""
    erf_map = erf.effective_receptive_field(model, variables, inputs)
    out = jax.eval_shape(
        lambda x: model.apply(variables, x, train=False), inputs[:1]
    ).shape
    _, centre = erf.centre_unit(inputs.shape[1:-1], out[1:-1])
    summary = erf.summarize_erf(erf_map, centre)
    erf.write_erf_png(erf_map, path, centre=centre, theoretical_rf=field.size)
    radii = ", ".join(f"{int(f * 100)}%: {r:.1f}" for f, r in summary.radii.items())
    sigma = ", ".join(f"{s:.1f}" for s in summary.sigma)
    return (
        f"effective receptive field over {inputs.shape[0]} {label} inputs of "
        f"{'x'.join(str(n) for n in inputs.shape[1:-1])} px\n"
        f"  radius holding {radii} of the gradient mass (px)\n"
        f"  Gaussian fit: sigma {sigma} px; mass within 1 sigma "
        f"{summary.mass_in_sigma:.3f} (a Gaussian: {summary.gaussian_mass_in_sigma:.3f})\n"
        f"  non-zero support {'x'.join(str(n) for n in summary.support)} px; "
        f"theoretical field {field.describe()[0]} px\n"
        f"  heatmap: {path}"
    )


def equivariance_section(
    model, variables, image: np.ndarray, window: int, stride: int, field: Field
) -> str:
    """Dense outputs on windows of `window` rows of `image` [1, L, *S, C]
    shifted by the total stride (aligned) and by half of it (not aligned)."""
    lines = []
    shifts = (stride, stride + stride // 2) if stride > 1 else (1,)
    for shift in shifts:
        report = equivariance.measure_equivariance(
            model,
            variables,
            image[:, : window + shift],
            shift,
            stride=stride,
            receptive_field=max(field.size),
        )
        lines.append(report.format())
    return "\n".join(lines)


def invariance_section(config, image: np.ndarray, window: int, stride: int) -> str:
    """Relative logit change of a classifier on this config's encoder (at
    initialisation) when its window moves by aligned and unaligned shifts."""
    fields = models.Classifier.__dataclass_fields__
    kwargs = {
        key: config.model[key]
        for key in ("backbone", "base_width", "max_width", "norm", "num_groups")
        if key in config.model and key in fields
    }
    for key in ("vgg_num_convs", "resnet_stage_sizes"):
        if key in config.model:
            kwargs[key] = tuple(config.model[key])
    classifier = models.Classifier(config.model.num_classes, **kwargs)
    init = jax.jit(functools.partial(classifier.init, train=False))
    variables = init(jax.random.key(config.train.seed), jnp.asarray(image[:, :window]))
    shifts = sorted({stride, 2 * stride, max(1, stride // 2), 1})
    changes = equivariance.measure_invariance(
        classifier, variables, image[:, : window + max(shifts)], shifts
    )
    rows = ", ".join(f"{t} px: {changes[t]:.3g}" for t in shifts)
    backbone = kwargs.get("backbone", "resnet")
    return (
        f"classifier ({backbone} encoder, global average pool, dense; initialisation):"
        f" relative change of the logits when the window moves by {rows}"
    )


def inspect_model(
    config: ml_collections.ConfigDict,
    *,
    workdir: str | None = None,
    step: int | None = None,
    best: bool = False,
    spatial: Sequence[int] = (),
    sections: Sequence[str] = ("table", "checkerboard"),
    erf_inputs: str = "random",
    erf_samples: int = 8,
    shift: int | None = None,
    output_dir: str = ".",
) -> str:
    """The report of the requested `sections` (see `SECTIONS`) as text."""
    input_shape = input_shape_from(config, spatial)
    models.create_model(config.model).check_input_shape(input_shape[1:-1])
    model, variables, origin = load_variables(
        config, input_shape, workdir, step=step, best=best
    )
    os.makedirs(output_dir, exist_ok=True)
    table = layer_table.trace_layers(model, input_shape)
    stride = shift or total_stride(table)
    parts = [f"{config.model.name}: {origin}"]
    if "table" in sections:
        parts.append(table_section(model, variables, input_shape, table))
    if "checkerboard" in sections:
        parts.append(
            "checkerboard:\n" + checkerboard_section(model, input_shape, output_dir)
        )
    if "erf" in sections:
        if erf_inputs == "data":
            inputs = real_images(config, erf_samples, input_shape[1:-1])
        else:
            rng = np.random.default_rng(config.train.seed)
            inputs = rng.standard_normal((erf_samples, *input_shape[1:]), np.float32)
        tag = origin.split(" of ")[0].split(" (")[0].replace(" ", "_")
        path = os.path.join(output_dir, f"erf_{tag}_{erf_inputs}.png")
        parts.append(
            erf_section(model, variables, inputs, table.output_field, path, erf_inputs)
        )
    if "equivariance" in sections:
        window = input_shape[1]
        rows = window + 2 * stride
        if erf_inputs == "data":
            image = real_images(config, 1, (rows, *input_shape[2:-1]))
        else:
            rng = np.random.default_rng(config.train.seed + 1)
            image = rng.standard_normal((1, rows, *input_shape[2:]), np.float32)
        parts.append(
            equivariance_section(
                model, variables, image, window, stride, table.output_field
            )
        )
        parts.append(invariance_section(config, image, window, stride))
    return "\n\n".join(parts)
