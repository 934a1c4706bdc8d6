"""Per-layer table of any model: shapes, strides, receptive fields, params, FLOPs.

`trace_layers` initialises the model abstractly (`jax.eval_shape`) with a
method interceptor that sees every module call. Leaf layers (convs, transposed
convs, pools, resizes, norms, dense) become rows in data-flow order; each
array a module returns is tagged with its receptive field, so a layer finds
the field of its input. Arrays made between modules (ReLU, concatenation,
sums, crops) are matched to the largest field among the arrays of the same
shape made inside the same enclosing module; that is the join rule of the
recurrence (see `receptive_field`).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax.analysis.receptive_field import Field
from fcn_jax.models import layers
from fcn_jax.models.batch_norm_relu import BatchNormReLU

# BatchNormReLU counts as its norm: ReLUs are not layers of the table either way.
NORMS = (nn.BatchNorm, BatchNormReLU, nn.GroupNorm, nn.LayerNorm)
# Element-wise work XLA counts for a norm in inference: subtract, scale, shift.
NORM_FLOPS_PER_ELEMENT = 4


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One leaf layer. Shapes are [B, *S, C]; FLOPs for the whole batch."""

    path: str
    kind: str
    output_shape: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    field: Field
    params: int
    flops: int  # every tap
    flops_on_image: int  # taps on zero padding left out


@dataclasses.dataclass
class LayerTable:
    rows: list[LayerRow]
    output_field: Field
    module_fields: dict[str, Field]  # every module's output, by path
    total_params: int  # from the parameter tree
    input_shape: tuple[int, ...]

    @property
    def row_params(self) -> int:
        return sum(row.params for row in self.rows)

    @property
    def row_flops(self) -> int:
        return sum(row.flops for row in self.rows)

    @property
    def row_flops_on_image(self) -> int:
        return sum(row.flops_on_image for row in self.rows)


class _Frame:
    """One module call in progress: its input and the arrays made inside it."""

    def __init__(self, x: Any = None, field: Field | None = None):
        self.input = x
        self.input_field = field
        self.arrays: list[tuple[Any, Field]] = []


def _join(fields: list[Field]) -> Field:
    joined = fields[0]
    for field in fields[1:]:
        joined = joined.largest(field)
    return joined


def _spatial(array: Any) -> tuple[int, ...]:
    return tuple(array.shape[1:-1])


class _Tracer:
    """Tags arrays with fields while the interceptor walks the module calls."""

    def __init__(self, rank: int):
        self.rank = rank
        self.fields: dict[int, tuple[Any, Field]] = {}  # id -> (array, field)
        self.frames: list[_Frame] = [_Frame()]
        self.rows: list[tuple[nn.Module, Any, Any, Field]] = []
        self.module_fields: dict[str, Field] = {}

    def tag(self, array: Any, field: Field) -> None:
        # Keeping the array alive keeps its id from being reused.
        self.fields[id(array)] = (array, field)
        self.frames[-1].arrays.append((array, field))

    def field_of(self, array: Any) -> Field:
        """A tagged array's field; else the join of the same-shaped arrays made
        in the innermost enclosing call that has any; else the field of that
        call's input, seen through the shape change."""
        if id(array) in self.fields:
            return self.fields[id(array)][1]
        for frame in reversed(self.frames):
            same = [f for a, f in frame.arrays if _spatial(a) == _spatial(array)]
            if same:
                return _join(same)
            if frame.input_field is not None:
                return frame.input_field.reshaped(
                    _spatial(frame.input), _spatial(array)
                )
        return Field.of_input(self.rank)

    def __call__(self, next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        x = args[0] if args else None
        is_array = isinstance(x, jax.Array | jax.ShapeDtypeStruct) and x.ndim >= 2
        if is_array and not self.fields and not self.rows:
            self.tag(x, Field.of_input(x.ndim - 2))
        in_field = self.field_of(x) if is_array else None
        frame = _Frame(x if is_array else None, in_field)
        self.frames.append(frame)
        try:
            y = next_fun(*args, **kwargs)
        finally:
            self.frames.pop()
        self.frames[-1].arrays.extend(frame.arrays)
        leaf = _leaf_field(module, x, y, in_field)
        if leaf is not None:
            self.rows.append((module, x, y, leaf))
            self.tag(y, leaf)
        for out in jax.tree.leaves(y):
            if getattr(out, "ndim", 0) >= 2 and id(out) not in self.fields:
                self.tag(out, self._output_field(out, frame))
        if isinstance(y, jax.Array) and y.ndim >= 2:
            self.module_fields["/".join(module.path)] = self.fields[id(y)][1]
        return y

    def _output_field(self, out: Any, frame: _Frame) -> Field:
        """An untagged module output: the join of the same-shaped arrays made
        inside; else its input's field, global if anything inside was."""
        same = [f for a, f in frame.arrays if _spatial(a) == _spatial(out)]
        if same:
            return _join(same)
        field = Field.of_input(self.rank)
        if frame.input_field is not None:
            field = frame.input_field.reshaped(_spatial(frame.input), _spatial(out))
        if any(f.is_global for _, f in frame.arrays):
            field = field.made_global()
        return field


def _leaf_field(module: nn.Module, x: Any, y: Any, field: Field | None) -> Field | None:
    """The field of a leaf layer's output, or None if `module` is not a leaf."""
    if field is None:
        return None
    rank = x.ndim - 2
    if isinstance(module, nn.Conv):
        kernel, stride, dilation = _conv_geometry(module, rank)
        return field.conv(kernel, stride, dilation)
    if isinstance(module, layers.TransposedConv):
        return field.transposed_conv(
            (module.kernel_size,) * rank, (module.stride,) * rank
        )
    if isinstance(module, nn.ConvTranspose):
        kernel, stride, _ = _conv_geometry(module, rank)
        return field.transposed_conv(kernel, stride)
    if isinstance(module, layers.MaxPool):
        return field.conv((module.window,) * rank, (module.stride,) * rank, (1,) * rank)
    if isinstance(module, layers.Downsample) and module.method != "strided_conv":
        factor = (module.factor,) * rank
        return field.conv(factor, factor, (1,) * rank)
    if isinstance(module, layers.Resize):
        return field.resize(x.shape[1:-1], y.shape[1:-1], module.method)
    if isinstance(module, NORMS):
        # Batch statistics are per channel; GroupNorm's span the image.
        return field.made_global() if isinstance(module, nn.GroupNorm) else field
    if isinstance(module, nn.Dense):
        return field.made_global()
    return None


def _tuple(value: Any, rank: int, default: int = 1) -> tuple[int, ...]:
    if value is None:
        return (default,) * rank
    if isinstance(value, int):
        return (value,) * rank
    return tuple(value)


def _conv_geometry(module: nn.Module, rank: int):
    kernel = _tuple(module.kernel_size, rank)
    stride = _tuple(module.strides, rank)
    dilation = _tuple(getattr(module, "kernel_dilation", None), rank)
    return kernel, stride, dilation


def _count(tree: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _params_at(params: dict, path: Sequence[str]) -> Any:
    node = params
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return {}
        node = node[name]
    return node


def _taps_on_image(
    n_in: int, n_out: int, kernel: int, stride: int, dilation: int, padding: Any
) -> int:
    """(output unit, tap) pairs along one axis whose tap reads the image, not
    the zero padding around it."""
    span = (kernel - 1) * dilation + 1
    low = max((n_out - 1) * stride + span - n_in, 0) // 2 if padding == "SAME" else 0
    return sum(
        0 <= o * stride + a * dilation - low < n_in
        for o in range(n_out)
        for a in range(kernel)
    )


def _conv_macs(module: nn.Conv, x: Any, y: Any, geometry, on_image: bool) -> int:
    """Multiply-adds of a conv: every tap, or only taps that read the image."""
    kernel, stride, dilation = geometry
    per_position = x.shape[-1] // module.feature_group_count * y.shape[-1]
    if not on_image:
        return int(np.prod(y.shape[:-1])) * math.prod(kernel) * per_position
    taps = math.prod(
        _taps_on_image(n_in, n_out, k, s, d, module.padding)
        for n_in, n_out, k, s, d in zip(
            x.shape[1:-1], y.shape[1:-1], kernel, stride, dilation
        )
    )
    return y.shape[0] * taps * per_position


def _flops(
    module: nn.Module, x: Any, y: Any, kernel: tuple[int, ...], on_image: bool = False
) -> int:
    """Multiply-adds count 2; pools count one op per window element. With
    `on_image`, conv taps that fall on zero padding are not counted (as XLA
    counts them)."""
    out_elements = int(np.prod(y.shape))
    bias = out_elements if getattr(module, "use_bias", False) else 0
    if isinstance(module, nn.Conv):
        geometry = _conv_geometry(module, x.ndim - 2)
        return 2 * _conv_macs(module, x, y, geometry, on_image) + bias
    if isinstance(module, layers.TransposedConv | nn.ConvTranspose):
        macs = int(np.prod(x.shape)) * math.prod(kernel) * y.shape[-1]
        return 2 * macs + out_elements
    if isinstance(module, nn.Dense):
        return 2 * int(np.prod(x.shape)) * y.shape[-1] + bias
    if isinstance(module, layers.MaxPool | layers.Downsample):
        return out_elements * math.prod(kernel)
    if isinstance(module, NORMS):
        return NORM_FLOPS_PER_ELEMENT * out_elements
    if isinstance(module, layers.Resize):
        taps = 1 if module.method == "nearest" else 2 ** (x.ndim - 2)
        return 2 * taps * out_elements
    return 0


def _row(module: nn.Module, x: Any, y: Any, field: Field, params: dict) -> LayerRow:
    rank = max(x.ndim - 2, 0)
    kernel = stride = dilation = (1,) * rank
    if isinstance(module, nn.Conv | nn.ConvTranspose):
        kernel, stride, dilation = _conv_geometry(module, rank)
    elif isinstance(module, layers.TransposedConv):
        kernel, stride = (module.kernel_size,) * rank, (module.stride,) * rank
    elif isinstance(module, layers.MaxPool):
        kernel, stride = (module.window,) * rank, (module.stride,) * rank
    elif isinstance(module, layers.Downsample):
        kernel = stride = (module.factor,) * rank
    return LayerRow(
        path="/".join(module.path),
        kind=type(module).__name__,
        output_shape=tuple(y.shape),
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        field=field,
        params=_count(_params_at(params, module.path)),
        flops=_flops(module, x, y, kernel),
        flops_on_image=_flops(module, x, y, kernel, on_image=True),
    )


def trace_layers(model: nn.Module, input_shape: Sequence[int]) -> LayerTable:
    """The layer table of `model` on inputs of `input_shape` ([B, *S, C])."""
    input_shape = tuple(input_shape)
    if getattr(model, "skip_conv", "concat") != "concat":
        # The same layers and parameters, with each skip join one nn.Conv row.
        model = model.clone(skip_conv="concat")
    tracer = _Tracer(len(input_shape) - 2)

    def init(x):
        with nn.intercept_methods(tracer):
            return model.init_with_output(jax.random.key(0), x, train=False)

    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    _, variables = jax.eval_shape(init, x)
    params = variables.get("params", {})
    rows = [_row(m, x_in, y, f, params) for m, x_in, y, f in tracer.rows]
    return LayerTable(
        rows=rows,
        output_field=_output_field(tracer, rows),
        module_fields=tracer.module_fields,
        total_params=_count(params),
        input_shape=input_shape,
    )


def _output_field(tracer: _Tracer, rows: list[LayerRow]) -> Field:
    top = tracer.module_fields.get("")
    if top is not None:
        return top
    return rows[-1].field if rows else Field.of_input(tracer.rank)


def xla_forward_flops(
    model: nn.Module, variables: Any, input_shape: Sequence[int]
) -> float:
    """FLOPs of the compiled inference forward pass, from XLA's cost analysis."""
    if getattr(model, "conv_forward", "xla") != "xla":
        # XLA counts nothing inside the CPU conv kernel's custom calls.
        model = model.clone(conv_forward="xla")

    def forward(variables, x):
        return model.apply(variables, x, train=False)

    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    compiled = jax.jit(forward).lower(variables, x).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])
