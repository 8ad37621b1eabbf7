"""QTensor: a block-quantised tensor (packed codes, block scales, side data, and its format)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .presets import Format


@dataclass
class QTensor:
    """Codes are stored with the quantised axis moved last: ``codes`` is uint8
    [*lead, packed bytes] and ``scales`` is [*lead, n_blocks] (uint8 E8M0/E4M3 codes or float32
    absmax). ``side`` holds what some formats need besides: "tensor_scale" (NVFP4), "codebook"
    (quantile), "outlier_index" (int32, int64 from 2**31 elements on; flat positions in the
    padded [*lead, n_blocks*block] layout) with "outlier_value" (bfloat16) for OPQ."""

    fmt: Format
    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    axis: int
    block: int  # the block length actually used (the row length for whole-row blocks)
    side: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scales": self.scales, **self.side}

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes, scales and every piece of side data."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / self.numel if self.numel else float("nan")

    def to(self, device) -> "QTensor":
        moved = {k: v.to(device) for k, v in self.side.items()}
        return QTensor(self.fmt, self.codes.to(device), self.scales.to(device), self.shape,
                       self.dtype, self.axis, self.block, moved)

    def __repr__(self) -> str:
        return (f"QTensor({self.fmt.key}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"axis={self.axis}, {self.bits_per_element:.3f} bits/element)")
