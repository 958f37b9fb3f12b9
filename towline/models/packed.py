"""Linear layers packed for the CPU, so that a pass over a few tokens costs about what one does.

PyTorch runs a float32 linear layer on the CPU through MKL, whose path for 2 to 16 rows of
input costs about twice its one-row path. Drafted decoding (:mod:`towline.models.lookup`)
and nudging's checks feed a few tokens per pass, so that cost decides whether a draft pays.
oneDNN, with each weight matrix reordered once into its own blocked layout (what
``torch.compile`` does to frozen weights on CPU), takes those rows for about the time of one.

oneDNN's kernels for one to three rows are slower than its kernel for four, on a layer too
large for the CPU's caches (all of a model's layers, one after the other, are): gemma-3-270m's
output layer (640 x 262,144) takes 41, 50, 34 and 31 ms for 1, 2, 3 and 4 rows, one thread. So
fewer than :data:`FEWEST_ROWS` rows are padded with zeros up to it: a row's output does not
depend on the other rows of a product, and the padding's outputs are dropped.

Measured on one AVX-512 core (``python bench/pass_cost.py``), a whole forward pass over 200
cached tokens, in units of a one-token pass of the same model with stock layers:

====================  =====  =====  =====  =====  =====
tokens in the pass        1      2      3      4      8
====================  =====  =====  =====  =====  =====
stock (MKL)            1.00   2.01   2.75   1.80   2.06
packed (oneDNN)        0.72   0.75   0.77   0.74   0.95
====================  =====  =====  =====  =====  =====

(gemma-3-270m; SmolLM2-135M and the Qwen2.5-Coder models fall alike: docs/speed.md.)

>>> layer = torch.nn.Linear(8, 4)
>>> model = torch.nn.Sequential(layer)
>>> pack_linear_layers(model) == (1 if available() else 0)
True
>>> x = torch.randn(3, 8)
>>> bool(torch.allclose(model(x), layer(x), atol=1e-5))
True
"""

from __future__ import annotations

import functools

import torch

FEWEST_ROWS = 4
"""Fewer input rows than this are padded up to it (oneDNN's fastest small kernel)."""


class PackedLinear(torch.nn.Module):
    """A float32 :class:`torch.nn.Linear` whose weight oneDNN has reordered for itself.

    The packed weight is a copy: a weight the model also uses elsewhere (an output layer
    tied to the input embeddings) is then held twice."""

    def __init__(self, packed_weight: torch.Tensor, bias: torch.Tensor | None, *,
                 in_features: int, out_features: int) -> None:
        super().__init__()
        self.packed_weight, self.bias = packed_weight, bias
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> PackedLinear:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), None)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, bias, in_features=linear.in_features, out_features=linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= FEWEST_ROWS:
            return self._product(x)
        flat = x.reshape(rows, self.in_features)
        padded = torch.cat([flat, flat.new_zeros(FEWEST_ROWS - rows, self.in_features)])
        return self._product(padded)[:rows].reshape(*x.shape[:-1], self.out_features)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        # An opaque oneDNN tensor has no storage for deepcopy to copy, but it clones.
        return PackedLinear(self.packed_weight.clone(), None if self.bias is None else self.bias.clone(),
                            in_features=self.in_features, out_features=self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@functools.cache
def available() -> bool:
    """Whether this PyTorch build packs linear layers, and a packed one computes what the
    stock one does (the ops are PyTorch's own, for its compiler, so they are checked once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's random numbers stay theirs
            layer = torch.nn.Linear(16, 8)
            x = torch.randn(2, 3, 16)
            return bool(torch.allclose(PackedLinear.of(layer)(x), layer(x), atol=1e-5))
    except (RuntimeError, AttributeError):  # an op this build lacks, or one that refuses
        return False


def pack_linear_layers(model: torch.nn.Module) -> int:
    """Replace, in place, every float32 :class:`torch.nn.Linear` of a CPU ``model`` by a
    :class:`PackedLinear`; returns how many. Other layers (quantized ones, subclasses,
    other dtypes or devices) are left as they are, and so is everything where
    :func:`available` says no."""
    if not available():
        return 0
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is torch.nn.Linear and child.weight.dtype == torch.float32
                    and child.weight.device.type == "cpu"):
                setattr(parent, name, PackedLinear.of(child))
                packed += 1
    return packed
