"""Output-size formulas for convolution, transposed convolution and pooling.

All functions work on one spatial dimension with plain Python ints, so size
planning never needs parameters or a traced array.
"""


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be a positive integer.")


def conv_output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> int:
    """Size of a convolution's output along one dimension.

    floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1, with
    `padding` added on both sides.

    Raises:
      ValueError: if an argument is out of range or the output would be empty.
    """
    _check_positive(size=size, kernel=kernel, stride=stride, dilation=dilation)
    if padding < 0:
        raise ValueError(f"padding={padding} must be non-negative.")
    span = dilation * (kernel - 1) + 1
    padded = size + 2 * padding
    if padded < span:
        raise ValueError(
            f"a kernel spanning {span} (kernel={kernel}, dilation={dilation}) does "
            f"not fit in size={size} with padding={padding}."
        )
    return (padded - span) // stride + 1


def transposed_conv_output_size(
    size: int, kernel: int, stride: int, padding: int = 0, output_padding: int = 0
) -> int:
    """Size of a transposed convolution's output along one dimension.

    stride * (size - 1) + kernel - 2 * padding + output_padding: the input size
    of a convolution with the same kernel, stride and padding that maps back to
    `size`; `output_padding` picks among the `stride` sizes that do.

    Raises:
      ValueError: if output_padding >= stride or the output would be empty.
    """
    _check_positive(size=size, kernel=kernel, stride=stride)
    if padding < 0 or output_padding < 0:
        raise ValueError(
            f"padding={padding} and output_padding={output_padding} must be "
            "non-negative."
        )
    if output_padding >= stride:
        raise ValueError(
            f"output_padding={output_padding} must be smaller than stride={stride}."
        )
    out = stride * (size - 1) + kernel - 2 * padding + output_padding
    if out < 1:
        raise ValueError(
            f"transposed conv with size={size}, kernel={kernel}, stride={stride}, "
            f"padding={padding}, output_padding={output_padding} has output size "
            f"{out} < 1."
        )
    return out


def pool_output_size(
    size: int, window: int, stride: int | None = None, padding: int = 0
) -> int:
    """Size of a pooling output along one dimension; stride defaults to window.

    Uses the convolution formula (incomplete windows are dropped, as with
    'VALID' pooling).
    """
    return conv_output_size(size, window, window if stride is None else stride, padding)
