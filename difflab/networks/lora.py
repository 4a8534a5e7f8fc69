"""LoRA: low-rank adaptation of a network's layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models").

A frozen layer ``h = W0 x`` becomes ``h = W0 x + s * (alpha / r) * B A x`` (eq. 3 with the
``alpha / r`` scaling of sec. 4.1), with ``A [r, in]`` random (Kaiming-uniform, as a Linear's
default init) and ``B [out, r]`` zero, so a fresh adapter leaves the network exactly as it was;
``s`` is the strength chosen at inference. A convolution gets ``A`` = a conv with the layer's
kernel (and its stride and padding) to ``r`` channels and ``B`` = a 1x1 conv back to ``out``:
their composition is the conv with weight ``B @ A`` (``[out, in, kh, kw]``), so one formula,
``dW = B @ A.flatten(1)``, covers both.

The adapter never changes the base network's ``state_dict``: :meth:`LoRA.attach` registers a
forward pre-hook on each target layer's *parent* that shows the layer the weight
``W0 + sum_i s_i (alpha_i / r_i) B_i A_i`` for the duration of the parent's call (a plain
attribute shadowing the parameter; the ``Parameter`` itself is untouched) and a forward hook
that removes it again. Hooking the parent rather than the layer also covers blocks that read a
layer's weight directly (the U-Net's fused ResBlock path). Several adapters attached to one
network add up. :meth:`LoRAHandle.merge` folds one adapter into the base weights in place (and
stops its hook), :meth:`LoRAHandle.unmerge` restores the weights it changed exactly (or, if
something else wrote to them since, subtracts the product again).
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difflab.config import check_ranges, option
from difflab.networks.cross_attention import CrossAttentionBlock
from difflab.networks.dit_layers import SelfAttention, TokenCrossAttention
from difflab.networks.unet import AttentionBlock, ResBlock

__all__ = ["LoRA", "LoRAConfig", "LoRAHandle", "attention_targets", "lora_targets"]

#: block class -> names of its attention projections (the default LoRA targets)
ATTENTION_LAYERS: dict[type[nn.Module], tuple[str, ...]] = {
    AttentionBlock: ("qkv", "proj"),
    CrossAttentionBlock: ("q", "kv", "proj"),
    SelfAttention: ("qkv", "proj"),
    TokenCrossAttention: ("q", "kv", "proj"),
}
#: block class -> names of its convolutions (targets with ``conv=True``)
CONV_LAYERS: dict[type[nn.Module], tuple[str, ...]] = {ResBlock: ("conv1", "conv2")}


@dataclass
class LoRAConfig:
    """What a LoRA adapter is: its rank, alpha and the layers it adapts (names and weight
    shapes), enough to rebuild it from JSON alone (``build_network("lora", config)``)."""

    rank: int = option(4, "rank r of each update B A", ge=1)
    alpha: float | None = option(
        None, "the update is scaled by alpha / rank (Hu et al. 2021 sec. 4.1); None: alpha = "
              "rank (scale 1)", gt=0)
    targets: list[str] = option(help="names of the adapted layers in the base network",
                                factory=list, cli=False)
    shapes: list[list[int]] = option(
        help="weight shape of each target: [out, in] (Linear) or [out, in, kh, kw] (Conv2d)",
        factory=list, cli=False)

    def __post_init__(self) -> None:
        check_ranges(self)
        if len(self.targets) != len(self.shapes):
            raise ValueError(f"LoRA config: {len(self.targets)} targets but "
                             f"{len(self.shapes)} shapes")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("LoRA config: a target layer is named twice")
        for name, shape in zip(self.targets, self.shapes, strict=True):
            if len(shape) not in (2, 4) or min(shape) < 1:
                raise ValueError(f"LoRA target {name!r}: bad weight shape {shape}")

    @property
    def factor(self) -> float:
        """alpha / rank, the fixed scale of every update."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def num_parameters(self) -> int:
        """Parameter count: r * (in * kh * kw + out) per target (r (in + out) per Linear)."""
        return sum(self.rank * (math.prod(s[1:]) + s[0]) for s in self.shapes)

    @classmethod
    def for_network(cls, net: nn.Module, rank: int = 4, alpha: float | None = None,
                    conv: bool = False, targets: Sequence[str] | None = None) -> LoRAConfig:
        """The config of a LoRA on ``net``'s layers (see :func:`lora_targets`)."""
        layers = lora_targets(net, conv=conv, targets=targets)
        return cls(rank=rank, alpha=alpha, targets=[n for n, _ in layers],
                   shapes=[list(m.weight.shape) for _, m in layers])


def _adaptable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def attention_targets(net: nn.Module, conv: bool = False) -> list[str]:
    """Names of ``net``'s attention projections (U-Net self- and cross-attention qkv / q / kv
    / proj, DiT attention qkv / proj / q / kv), plus its ResBlock convolutions with ``conv``."""
    names = []
    for name, m in net.named_modules():
        wanted = ATTENTION_LAYERS.get(type(m), ()) + (CONV_LAYERS.get(type(m), ()) if conv
                                                       else ())
        names += [f"{name}.{a}" if name else a for a in wanted]
    return names


def lora_targets(net: nn.Module, conv: bool = False, targets: Sequence[str] | None = None
                 ) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the layers a LoRA on ``net`` adapts: ``targets`` = fnmatch patterns
    over layer names (Linear or Conv2d layers; e.g. ``"*.attn.qkv"``), or None for
    :func:`attention_targets`. No layer matched is a ValueError."""
    layers = dict(net.named_modules())
    if targets is None:
        names = attention_targets(net, conv)
        if not names:
            raise ValueError(f"{type(net).__name__} has no attention layers to adapt; name "
                             "the LoRA targets")
        return [(n, layers[n]) for n in names]
    found = [(n, m) for n, m in layers.items()
             if _adaptable(m) and any(fnmatch.fnmatchcase(n, p) for p in targets)]
    if not found:
        raise ValueError(f"LoRA targets {list(targets)} match no Linear or Conv2d layer of "
                         f"{type(net).__name__}")
    return found


class LoRALayer(nn.Module):
    """The low-rank factors of one target: ``A [r, in, *kernel]`` (Kaiming-uniform) and
    ``B [out, r]`` (zero)."""

    def __init__(self, shape: Sequence[int], rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, *shape[1:]))
        self.B = nn.Parameter(torch.zeros(shape[0], rank))
        # Hu et al. 2021 sec. 4.1: A random, B = 0 so that dW = B A = 0 at the start
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def delta(self) -> Tensor:
        """``B @ A`` in the target weight's shape ``[out, in, *kernel]``."""
        return (self.B @ self.A.reshape(self.A.shape[0], -1)).reshape(
            self.B.shape[0], *self.A.shape[1:])


class LoRA(nn.Module):
    """A LoRA adapter: one :class:`LoRALayer` per target of its :class:`LoRAConfig` (its
    state dict: ``layers.{i}.A`` / ``layers.{i}.B`` in the order of ``config.targets``).
    Apply it with :meth:`attach`."""

    def __init__(self, config: LoRAConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(LoRALayer(s, config.rank) for s in config.shapes)
        self.handle: LoRAHandle | None = None

    def delta(self, i: int) -> Tensor:
        """``(alpha / r) B A`` of target ``i`` (without the strength)."""
        return self.config.factor * self.layers[i].delta()

    def check(self, net: nn.Module) -> list[nn.Module]:
        """``net``'s target layers; a name or shape that does not match is a ValueError
        naming the layer."""
        layers = dict(net.named_modules())
        out = []
        for name, shape in zip(self.config.targets, self.config.shapes, strict=True):
            m = layers.get(name)
            if m is None or not _adaptable(m):
                raise ValueError(f"LoRA target {name!r}: {type(net).__name__} has no Linear "
                                 "or Conv2d layer of that name")
            if list(m.weight.shape) != list(shape):
                raise ValueError(f"LoRA target {name!r}: the layer's weight is "
                                 f"{list(m.weight.shape)}, the LoRA was made for {shape}")
            out.append(m)
        return out

    def attach(self, net: nn.Module, scale: float = 1.0) -> LoRAHandle:
        """Add ``scale * (alpha / r) B A`` to each target layer of ``net`` while ``net`` runs
        (hooks; ``net``'s parameters and state dict do not change). One attachment at a time:
        :meth:`LoRAHandle.detach` first to move the adapter to another network."""
        if self.handle is not None:
            raise ValueError("this LoRA is already attached; detach it first")
        layers = self.check(net)
        names = dict(net.named_modules())
        parents = [names[n.rpartition(".")[0]] for n in self.config.targets]
        self.handle = LoRAHandle(self, layers, parents, scale)
        return self.handle

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a LoRA is not called; attach it to its base network (LoRA.attach)")


class _Patch:
    """The hooks on one parent module: for each of its adapted layers, the adapters that add
    to it. One pair of hooks per parent, so any number of adapters compose."""

    def __init__(self, parent: nn.Module) -> None:
        self.users: dict[nn.Module, list[tuple[LoRAHandle, int]]] = {}
        self.hooks = (parent.register_forward_pre_hook(self._pre),
                      parent.register_forward_hook(self._post, always_call=True))

    def _pre(self, module: nn.Module, args: Any) -> None:
        for layer, users in self.users.items():
            parts = [h.lora.delta(i) * h.scale for h, i in users if h.active]
            if parts:
                w = layer._parameters["weight"]
                # a plain attribute shadows the Parameter for this call (it stays in
                # _parameters, so state_dict and parameters() never change)
                layer.__dict__["weight"] = w + sum(parts).to(w.dtype)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        for layer in self.users:
            layer.__dict__.pop("weight", None)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


#: parent module -> its hooks (weak: a dropped network takes its patches with it)
_PATCHES: weakref.WeakKeyDictionary[nn.Module, _Patch] = weakref.WeakKeyDictionary()


class LoRAHandle:
    """One LoRA attached to one network: its strength ``scale``, :meth:`merge` /
    :meth:`unmerge` into the base weights, :meth:`detach`."""

    def __init__(self, lora: LoRA, layers: list[nn.Module], parents: list[nn.Module],
                 scale: float) -> None:
        self.lora, self.layers, self.parents = lora, layers, parents
        self._scale = float(scale)
        self.merged = False
        self._saved: list[tuple[Tensor, int]] = []  # merge(): each weight before, its version
        for i, (layer, parent) in enumerate(zip(layers, parents, strict=True)):
            patch = _PATCHES.get(parent)
            if patch is None:
                patch = _PATCHES[parent] = _Patch(parent)
            patch.users.setdefault(layer, []).append((self, i))

    @property
    def active(self) -> bool:
        """The hooks add this adapter (attached, not merged, nonzero scale)."""
        return not self.merged and self._scale != 0.0 and self.lora.handle is self

    @property
    def scale(self) -> float:
        """The strength s in ``W0 + s (alpha / r) B A``; 0 leaves the network as it is."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if self.merged:
            raise ValueError("cannot change the scale of a merged LoRA; unmerge it first")
        if not math.isfinite(value):
            raise ValueError(f"LoRA scale must be a finite number, got {value}")
        self._scale = float(value)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scale (alpha / r) B A`` into the base weights in place and stop the hooks
        adding it (faster sampling, same outputs up to rounding)."""
        if self.merged:
            raise ValueError("this LoRA is already merged")
        self._saved = []
        for i, layer in enumerate(self.layers):
            w = layer.weight
            before = w.detach().clone()
            w.add_((self._scale * self.lora.delta(i)).to(w.dtype))
            self._saved.append((before, w._version))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` and let the hooks add the update again. A weight nothing wrote
        to since the merge gets its exact former value back; one changed since (another
        adapter merged after this one, an optimizer step) gets the product subtracted."""
        if not self.merged:
            raise ValueError("this LoRA is not merged")
        for i, (layer, (before, version)) in enumerate(zip(self.layers, self._saved,
                                                            strict=True)):
            w = layer.weight
            if w._version == version:
                w.copy_(before)
            else:
                w.sub_((self._scale * self.lora.delta(i)).to(w.dtype))
        self._saved = []
        self.merged = False

    def detach(self) -> None:
        """Remove the adapter from the network (unmerging it first if merged)."""
        if self.lora.handle is not self:
            return
        if self.merged:
            self.unmerge()
        for i, (layer, parent) in enumerate(zip(self.layers, self.parents, strict=True)):
            patch = _PATCHES[parent]
            users = patch.users[layer]
            users.remove((self, i))
            if not users:
                del patch.users[layer]
            if not patch.users:
                patch.remove()
                del _PATCHES[parent]
        self.lora.handle = None


def attach_all(loras: Iterable[tuple[LoRA, float]], net: nn.Module) -> list[LoRAHandle]:
    """Attach several adapters with their weights: their updates add up."""
    return [lora.attach(net, scale) for lora, scale in loras]
