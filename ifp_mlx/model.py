"""IFP layers: FFNs stored unit-major so any subset of units is one row gather.

mlx-lm's MLPs compute ``down_proj(act(gate_proj(x)) * up_proj(x))``. ``gate_proj`` and
``up_proj`` already hold one row per FFN unit; only ``down_proj`` holds a unit per *column*.
We replace it by :class:`UnitLinear` (weight ``(units, hidden)``, quantized along ``hidden``)
so gate, up and down all slice with the same row gather, for float and quantized weights,
without requantizing. The MLP's own ``__call__`` is untouched, so every mlx-lm family with a
gate/up/down MLP works with no family-specific code.
"""

from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

FORMAT_VERSION = 2  # 2: FFN units in a unit-bundled file (ifp_mlx.store); 1 still loads


class UnitLinear(nn.Module):
    """``y = x @ W (+ b)`` with ``W`` of shape ``(units, output_dims)``: a unit-major down_proj."""

    def __init__(self, units: int, output_dims: int, bias: bool = False):
        super().__init__()
        self.weight = mx.zeros((units, output_dims))
        if bias:
            self.bias = mx.zeros((output_dims,))

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self["weight"]
        if "bias" in self:
            y = y + self["bias"]
        return y

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "UnitLinear":
        out_dims, units = linear.weight.shape
        layer = cls(units, out_dims, bias="bias" in linear)
        layer.weight = mx.contiguous(linear.weight.T)
        if "bias" in linear:
            layer.bias = linear.bias
        return layer

    def to_quantized(
        self,
        group_size: Optional[int] = None,
        bits: Optional[int] = None,
        mode: str = "affine",
        **_,
    ) -> "QuantizedUnitLinear":
        return QuantizedUnitLinear.from_unit_linear(self, group_size, bits, mode)


class QuantizedUnitLinear(nn.Module):
    """Quantized :class:`UnitLinear`: each unit row has its own scales, so rows slice losslessly."""

    def __init__(
        self,
        units: int,
        output_dims: int,
        bias: bool = False,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(
            mx.zeros((units, output_dims)), group_size, bits, mode=mode
        )
        self.biases = biases[0] if biases else None
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(
            x,
            self["weight"],
            scales=self["scales"],
            biases=self.get("biases"),
            transpose=False,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        if "bias" in self:
            y = y + self["bias"]
        return y

    def dequantized(self) -> UnitLinear:
        units, _ = self.weight.shape
        w = mx.dequantize(
            self.weight, self.scales, self.biases, self.group_size, self.bits, self.mode
        )
        layer = UnitLinear(units, w.shape[1], bias="bias" in self)
        layer.weight = w
        if "bias" in self:
            layer.bias = self.bias
        return layer

    @classmethod
    def from_unit_linear(cls, layer: UnitLinear, group_size, bits, mode="affine"):
        units, out_dims = layer.weight.shape
        q = cls(units, out_dims, "bias" in layer, group_size or 64, bits or 4, mode)
        q.weight, q.scales, *biases = mx.quantize(layer.weight, q.group_size, q.bits, mode=mode)
        q.biases = biases[0] if biases else None
        if "bias" in layer:
            q.bias = layer.bias
        return q


def dequantize(model: nn.Module) -> nn.Module:
    """Float copy of every quantized layer in place (reference models in tests and evals)."""
    from mlx_lm.utils import dequantize_model

    if hasattr(model, "dense"):  # restore, then forget the IFP store of quantized modules
        if model.ffn_store != "memory":
            from .errors import IFPError

            raise IFPError("dequantizing needs the whole model in memory: load(ffn_store='memory')")
        model.dense()
        model.__dict__.pop("_ifp_ffn_store", None)
    for _, mlp in find_ffns(model):
        if isinstance(mlp.down_proj, QuantizedUnitLinear):
            mlp.down_proj = mlp.down_proj.dequantized()
    return exact_embed_scale(dequantize_model(model))


_SCALED: dict = {}


def exact_embed_scale(model: nn.Module) -> nn.Module:
    """Gemma 3's embedding scale √hidden in the weights' dtype, as transformers computes it.
    mlx-lm rounds it to bfloat16 for every dtype (√640 → 25.25 instead of 25.298: logits 0.2 %
    off at fp32); the embedding's output is multiplied by the ratio, which is 1 in bfloat16.
    Re-applied whenever the embedding module is replaced (quantization, dequantization)."""
    args = getattr(model, "args", None)
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(args, "model_type", None) != "gemma3_text" or emb is None:
        return model
    root = args.hidden_size**0.5
    ratio = root / mx.array(root, dtype=mx.bfloat16).item()
    base = type(emb)
    if ratio == 1.0 or base in _SCALED.values():
        return model
    if base not in _SCALED:
        _SCALED[base] = type(f"ExactScale{base.__name__}", (base,), {
            "__call__": lambda self, x: base.__call__(self, x) * self.__dict__["_ifp_ratio"]})  # fmt: skip
    emb.__class__ = _SCALED[base]
    emb.__dict__["_ifp_ratio"] = ratio
    return model


def is_ffn(module: nn.Module) -> bool:
    """A gate/up/down MLP whose units we can slice (dense or quantized, either down layout)."""
    linear = (nn.Linear, nn.QuantizedLinear, UnitLinear, QuantizedUnitLinear)

    def sliceable(layer) -> bool:  # a LoRA wrapper (joint training) counts as its base layer
        if getattr(layer, "ifp_streamed", False):  # units streamed from a flash store
            return True
        return isinstance(layer, linear) or isinstance(getattr(layer, "linear", None), linear)

    return all(sliceable(getattr(module, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))


def find_ffns(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, mlp) of every sliceable FFN, in layer order."""
    found = [(p, m) for p, m in model.named_modules() if p and is_ffn(m)]

    def order(item):
        return [int(s) if s.isdigit() else -1 for s in item[0].split(".")]

    return sorted(found, key=order)


def to_unit_major(model: nn.Module) -> List[str]:
    """Swap every FFN's ``down_proj`` for a :class:`UnitLinear`; returns the FFN paths."""
    paths = []
    for path, mlp in find_ffns(model):
        if isinstance(mlp.down_proj, nn.Linear):
            mlp.down_proj = UnitLinear.from_linear(mlp.down_proj)
        paths.append(path)
    return paths


class Tap(nn.Module):
    """Wraps an FFN's down projection to record and/or mask its input (the unit activations).

    Used for scoring (activation predictor, calibration) and for masked-dense reference
    models in tests; never present in a model that is decoding.
    """

    def __init__(
        self, inner: nn.Module, record: Optional[list], mask: Optional[mx.array], reduce, out=None
    ):
        super().__init__()
        self.inner = inner
        # Plain attributes, not module children: they are not parameters.
        object.__setattr__(self, "_record", record)
        object.__setattr__(self, "_mask", mask)
        object.__setattr__(self, "_reduce", reduce)
        object.__setattr__(self, "_out", out)

    def __call__(self, x: mx.array) -> mx.array:
        if self._record is not None:
            self._record.append(x if self._reduce is None else self._reduce(x))
        if self._mask is not None:
            x = x * self._mask
        y = self.inner(x)
        if self._out is not None:  # the layer's output summed over tokens (compensation)
            self._out.append(y.astype(mx.float32).sum(axis=(0, 1)))
        return y


class tap_ffns:
    """``with tap_ffns(model, record=True, masks=None) as records:`` — records[l] is a list of
    the activation inputs ``act(gate) * up`` that layer l's down projection saw (or of
    ``reduce(input)``: a predictor that only needs a per-unit summary keeps no activations).
    With ``outputs=True``, ``self.outputs[l]`` gets each call's output summed over tokens."""

    def __init__(
        self, model: nn.Module, record: bool = True, masks=None, reduce=None, outputs=False
    ):
        self.ffns = [m for _, m in find_ffns(model)]
        self.record = record
        self.masks = masks
        self.reduce = reduce
        self.outputs = [[] for _ in self.ffns] if outputs else None

    def __enter__(self) -> List[list]:
        self.records = [[] for _ in self.ffns]
        for i, mlp in enumerate(self.ffns):
            mask = None if self.masks is None else self.masks[i]
            rec = self.records[i] if self.record else None
            out = None if self.outputs is None else self.outputs[i]
            mlp.down_proj = Tap(mlp.down_proj, rec, mask, self.reduce, out)
        return self.records

    def __exit__(self, *exc):
        for mlp in self.ffns:
            mlp.down_proj = mlp.down_proj.inner
        return False


class RowMasked(nn.Module):
    """Wraps an FFN's down projection so each row of a batch computes its own pruned FFN on the
    full (or a shared) set of units: the row's activations outside its units are zeroed and its
    compensation bias is added. Used while several answers decode together
    (``ifp_mlx.batch``); the sum over units then skips exactly the units the row dropped."""

    def __init__(self, inner: nn.Module, mask: Optional[mx.array], delta: Optional[mx.array]):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_mask", mask)  # (rows, 1, units) 0/1, or None: all units
        object.__setattr__(self, "_delta", delta)  # (rows, 1, hidden), or None: no bias

    def __call__(self, x: mx.array) -> mx.array:
        if self._mask is not None:
            x = x * self._mask
        y = self.inner(x)
        return y if self._delta is None else y + self._delta


class row_masks:
    """``with row_masks(model, masks, deltas):`` each FFN layer l masks row b's units by
    ``masks[l][b]`` and adds ``deltas[l][b]`` (either None for the whole layer: every row keeps
    every unit / adds nothing)."""

    def __init__(self, model: nn.Module, masks: list, deltas: list):
        # A loaded model's FFN list (no module walk per decoded token), else found here.
        mlps = model.__dict__.get("_ifp_mlps")
        self.ffns = mlps if mlps is not None else [m for _, m in find_ffns(model)]
        self.masks, self.deltas = masks, deltas

    def __enter__(self):
        for mlp, mask, delta in zip(self.ffns, self.masks, self.deltas):
            if mask is not None or delta is not None:
                mlp.down_proj = RowMasked(mlp.down_proj, mask, delta)

    def __exit__(self, *exc):
        for mlp in self.ffns:
            if isinstance(mlp.down_proj, RowMasked):
                mlp.down_proj = mlp.down_proj.inner
        return False
