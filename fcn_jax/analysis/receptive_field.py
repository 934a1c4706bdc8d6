"""Theoretical receptive fields by the standard recurrence, per spatial axis.

For a layer of kernel k, dilation d and stride s, with k_eff = 1 + (k - 1) d:

    r_out = r_in + (k_eff - 1) * j_in        j_out = j_in * s

r is the receptive field size and j the jump (input pixels between adjacent
units), both in input pixels. Upsampling by s divides the jump: a transposed
conv lets ceil(k / s) input units reach an output unit, so r grows by
(ceil(k / s) - 1) * j_in; linear interpolation reads two neighbours (+ j_in),
nearest one. Where branches join (concatenation, sums), the receptive field is
the largest branch's. A global operation (image pooling) makes every unit
depend on the whole input; `is_global` marks it, and r keeps the local extent.
"""

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction


@dataclasses.dataclass(frozen=True)
class Field:
    """Receptive field `size` and `jump` per spatial axis, in input pixels."""

    size: tuple[int, ...]
    jump: tuple[Fraction, ...]
    is_global: bool = False

    @classmethod
    def of_input(cls, rank: int) -> "Field":
        return cls((1,) * rank, (Fraction(1),) * rank)

    def conv(
        self, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
    ) -> "Field":
        """After a conv or pool (the recurrence above)."""
        size = tuple(
            r + int((k - 1) * d * j)
            for r, k, d, j in zip(self.size, kernel, dilation, self.jump)
        )
        jump = tuple(j * s for j, s in zip(self.jump, stride))
        return Field(size, jump, self.is_global)

    def transposed_conv(self, kernel: Sequence[int], stride: Sequence[int]) -> "Field":
        """After a transposed conv: ceil(k / s) input units reach each output."""
        size = tuple(
            r + int((math.ceil(k / s) - 1) * j)
            for r, k, s, j in zip(self.size, kernel, stride, self.jump)
        )
        jump = tuple(j / s for j, s in zip(self.jump, stride))
        return Field(size, jump, self.is_global)

    def resize(
        self, in_shape: Sequence[int], out_shape: Sequence[int], method: str
    ) -> "Field":
        """After interpolation from `in_shape` to `out_shape` (per axis)."""
        size, jump = [], []
        for r, j, n_in, n_out in zip(self.size, self.jump, in_shape, out_shape):
            scale = Fraction(n_in, n_out)  # input units per output unit
            if method == "nearest":
                taps = 1
            elif scale <= 1:  # upsampling: two neighbours
                taps = 2
            else:  # antialiased downsampling spans 2 * scale inputs
                taps = math.ceil(2 * scale)
            size.append(r + int((taps - 1) * j))
            jump.append(j * scale)
        return Field(tuple(size), tuple(jump), self.is_global)

    def made_global(self) -> "Field":
        return dataclasses.replace(self, is_global=True)

    def reshaped(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> "Field":
        """Seen through an unrecorded op that maps `in_shape` to `out_shape`.

        Same shape, or a crop or pad: unchanged. A collapse to size 1 from a
        larger size: global pooling. A whole-number ratio: an interpolation.
        """
        if tuple(in_shape) == tuple(out_shape):
            return self
        if all(o == 1 for o in out_shape) and any(i > 1 for i in in_shape):
            return self.made_global()
        resampled = any(
            i != o and (max(i, o) % min(i, o) == 0) and max(i, o) >= 2 * min(i, o)
            for i, o in zip(in_shape, out_shape)
        )
        return self.resize(in_shape, out_shape, "linear") if resampled else self

    def largest(self, other: "Field") -> "Field":
        """The field of a join of two branches: the larger extent, per axis."""
        size = tuple(max(a, b) for a, b in zip(self.size, other.size))
        jump = self.jump if sum(self.size) >= sum(other.size) else other.jump
        return Field(size, jump, self.is_global or other.is_global)

    def describe(self) -> tuple[str, str]:
        """('size', 'jump') as text: one number when all axes agree."""

        def text(values) -> str:
            parts = [str(v) for v in values]
            return parts[0] if len(set(parts)) == 1 else "x".join(parts)

        size = text(self.size) + (" +global" if self.is_global else "")
        return size, text(self.jump)


def stack_field(layers: Sequence[tuple[int, int, int]], rank: int = 1) -> Field:
    """The field after a chain of (kernel, stride, dilation) convs or pools."""
    field = Field.of_input(rank)
    for kernel, stride, dilation in layers:
        field = field.conv((kernel,) * rank, (stride,) * rank, (dilation,) * rank)
    return field
