"""Text of the layer table, its totals and checks, valid sizes and ASPP fields."""

from collections.abc import Sequence

import flax.linen as nn

from fcn_jax.analysis.layer_table import LayerTable


def _axes(values: Sequence) -> str:
    parts = [str(v) for v in values]
    return parts[0] if len(set(parts)) == 1 else "x".join(parts)


def _human(count: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:.0f}"


def format_rows(table: LayerTable) -> str:
    """One line per leaf layer, in data-flow order."""
    header = (
        "layer",
        "kind",
        "output shape",
        "k",
        "s",
        "d",
        "RF",
        "jump",
        "params",
        "FLOPs",
    )
    lines = []
    for row in table.rows:
        size, jump = row.field.describe()
        lines.append(
            (
                row.path or "(model)",
                row.kind,
                "x".join(str(n) for n in row.output_shape),
                _axes(row.kernel) if row.kernel else "-",
                _axes(row.stride) if row.stride else "-",
                _axes(row.dilation) if row.dilation else "-",
                size,
                jump,
                f"{row.params:,}",
                _human(row.flops),
            )
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)
    ]
    right = {8, 9}

    def fmt(cells) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def format_totals(table: LayerTable, xla_flops: float | None) -> str:
    """Totals, checked against the parameter tree and XLA's FLOP count."""
    size, jump = table.output_field.describe()
    params_ok = "matches" if table.row_params == table.total_params else "DIFFERS from"
    shape = "x".join(str(n) for n in table.input_shape)
    params = (
        f"parameters: {table.row_params:,} summed over layers, {params_ok} the"
        f" parameter tree ({table.total_params:,})"
    )
    flops = (
        f"FLOPs (forward, batch {table.input_shape[0]}):"
        f" {_human(table.row_flops)} summed over layers"
    )
    lines = [
        f"input {shape}; output receptive field {size} px, jump {jump}",
        params,
        flops,
    ]
    if xla_flops:
        on_image = table.row_flops_on_image
        lines.append(
            f"  {_human(on_image)} without the conv taps that fall on zero padding;"
            f" XLA's cost analysis of the compiled forward pass: {_human(xla_flops)}"
            f" (ratio {on_image / xla_flops:.3f}; XLA also counts ReLUs and sums)"
        )
    return "\n".join(lines)


def format_valid_sizes(
    model: nn.Module, requested: int, radius: int = 40
) -> str | None:
    """For models with size constraints (VALID U-Nets), the valid input sizes
    near `requested` and the output size each gives; None if every size works."""
    if not hasattr(model, "valid_input_sizes"):
        return None
    lo, hi = max(1, requested - radius), requested + radius
    sizes = model.valid_input_sizes(lo, hi)
    if sizes == list(range(lo, hi + 1)):
        return None
    if not sizes:
        return f"no valid input size in [{lo}, {hi}]"
    pairs = ", ".join(f"{n}->{model.output_size(n)}" for n in sizes)
    verdict = "valid" if requested in sizes else "NOT valid"
    return f"input size {requested} is {verdict}; valid sizes in [{lo}, {hi}] (input->output): {pairs}"


def format_aspp(table: LayerTable) -> str | None:
    """The receptive field of each ASPP branch and of the module."""
    branches = {
        path: field
        for path, field in table.module_fields.items()
        if path.count("/") >= 1
        and path.rsplit("/", 1)[0].endswith("aspp")
        and not path.endswith("project")
    }
    if not branches:
        return None
    lines = ["ASPP receptive fields (input pixels):"]
    local = []
    for path, field in branches.items():
        size, _ = field.describe()
        if field.is_global:
            size = "whole image (global average pooling)"
        else:
            local.append(field)
        lines.append(f"  {path}: {size}")
    if local:
        largest = max(local, key=lambda f: sum(f.size))
        lines.append(
            f"  module (largest local branch): {largest.describe()[0]}"
            + (
                "; image pooling makes every output depend on the whole image"
                if len(local) < len(branches)
                else ""
            )
        )
    return "\n".join(lines)
