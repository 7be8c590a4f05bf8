"""Compaction: a physically smaller model that computes the same function as the masked one.

Sparse training leaves whole channels unused: output filters whose weights are all masked (Sparse
Momentum Sec. 5 / Table 3 estimates the "dense convolution" speedup of removing them; Starfire CK
can "prune all the input channels in an output channel", Sec. 2.1.1), and input channels that no
active weight reads. :func:`compact` removes both, with the channels of everything between them:
BatchNorm, activations, pooling, the flatten into a Linear layer (each channel's ``H*W`` features),
residual additions (the branches that meet keep the union of their channels) and depthwise
convolutions (whose input and output channels go together).

Which channels are coupled is read from the model itself: it is traced with ``torch.fx`` and every
tensor is given a *channel space*; operations that keep the channel index (activations, norms,
pools, additions, flatten) put their input and output in one space, and a space loses a channel only
where no reader needs it. Operations the analysis does not know keep all their channels (correct,
just not smaller), so any traceable model is handled exactly.

Exactness (the compact model's outputs equal the masked model's): a channel is removed only if
(a) no active weight reads it, (b) it is identically zero, or (c) -- at inference only
(``fold_constants``) -- it is a known constant per channel (a dead filter's bias, the BatchNorm
shift of a zero channel, an activation of either) and every reader is a Linear layer or an
ungrouped convolution: a Linear layer or an unpadded convolution absorbs ``sum(W[:, c]) * value``
in its bias; a padded convolution sees the constant as non-constant at its borders, so it gets the
exact contribution as a fixed output map (the constant image convolved with those kernels), valid
for the example input's spatial size (other sizes raise a clear error).
In training mode nothing is folded (a constant there depends on trainable parameters and its
readers' weights still receive gradients), so the compact model also has the same gradients for
every kept active weight.
"""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

log = logging.getLogger(__name__)

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Channel-wise operations: output channel c depends only on input channel c.
_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_UNARY_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.hardswish,
    F.hardtanh, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
}
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "relu_", "clone"}
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_ADD = {operator.add, operator.iadd, torch.add}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}

ZERO, CONST, VAR = 0, 1, 2


class TraceError(ValueError):
    """The model cannot be traced by ``torch.fx`` (data-dependent control flow, ...)."""


@dataclass
class Compaction:
    """What :func:`compact` did, to carry training state over to the compact model.

    Attributes:
        index: new parameter / buffer name -> ``(old name, [kept indices per dim or None])``.
        masks: new name -> bool mask of the compact weight (the old mask restricted to what is kept).
        removed: per layer, ``{"out": removed outputs, "in": removed inputs}``.
        folded: names of layers whose bias absorbed removed constant channels.
    """

    index: dict[str, tuple[str, list[Optional[Tensor]]]] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)
    removed: dict[str, dict[str, int]] = field(default_factory=dict)
    folded: list[str] = field(default_factory=list)

    def slice(self, name: str, old: Tensor) -> Tensor:
        """``old`` (a tensor shaped like the old parameter ``self.index[name][0]``) restricted to the kept part."""
        _, dims = self.index[name]
        out = old
        for d, keep in enumerate(dims):
            if keep is not None:
                out = out.index_select(d, keep.to(out.device))
        return out

    def optimizer(self, old_optimizer: torch.optim.Optimizer, old_model: nn.Module, new_model: nn.Module):
        """A new optimizer of the same class and hyper-parameters over ``new_model``, with every
        per-parameter state tensor (momentum, Adam moments) sliced like its parameter."""
        old_names = {id(p): n for n, p in old_model.named_parameters()}
        new_params = dict(new_model.named_parameters())
        old_of_new = {name: self.index.get(name, (name, None))[0] for name in new_params}
        groups, placed = [], set()
        for group in old_optimizer.param_groups:
            names = [old_names[id(p)] for p in group["params"] if id(p) in old_names]
            params = [new_params[n] for n, o in old_of_new.items() if o in names]
            placed.update(id(p) for p in params)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        extra = [p for p in new_params.values() if id(p) not in placed]  # biases created by folding
        if extra:
            groups[0]["params"] += extra
        new_opt = type(old_optimizer)(groups, **old_optimizer.defaults)
        old_by_name = dict(old_model.named_parameters())
        for name, p in new_params.items():
            old_name = old_of_new[name]
            old_p = old_by_name.get(old_name)
            state = old_optimizer.state.get(old_p) if old_p is not None else None
            if not state:
                continue
            new_state = {}
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == old_p.shape and name in self.index:
                    new_state[k] = self.slice(name, v).clone()
                elif torch.is_tensor(v):
                    new_state[k] = v.clone()
                else:
                    new_state[k] = copy.deepcopy(v)
            new_opt.state[p] = new_state
        return new_opt


# ----------------------------------------------------------------------------------------------
# analysis


class _Spaces:
    """Union-find of fx nodes that share a channel index."""

    def __init__(self):
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, n: fx.Node) -> fx.Node:
        self.parent.setdefault(n, n)
        while self.parent[n] is not n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[rb] = ra


def _shape(node: Any) -> Optional[torch.Size]:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if _shape(a) is not None]


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _LAYERS[1:]) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    src = _tensor_args(node)
    if len(src) != 1:
        return False
    a, b = _shape(src[0]), _shape(node)
    if b is None or len(a) < 3 or len(b) != 2 or a[0] != b[0] or b[1] != a[1:].numel():
        return False
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Flatten)
    return (node.op == "call_method" and node.target in _FLATTEN_METHODS) or (
        node.op == "call_function" and node.target is torch.flatten)


def _classify(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> str:
    """'layer', 'depthwise', 'norm', 'unary', 'add', 'flatten' or 'opaque' for a tensor node."""
    if node.op == "call_module":
        m = modules[node.target]
        if calls[node.target] > 1:
            return "opaque"  # a module called twice shares one weight between two spaces
        if isinstance(m, _LAYERS):
            ins = _tensor_args(node)
            if len(ins) != 1 or (isinstance(m, nn.Linear) and len(_shape(ins[0])) != 2):
                return "opaque"
            if _is_depthwise(m):
                return "depthwise"
            return "layer" if isinstance(m, nn.Linear) or m.groups == 1 else "opaque"
        if isinstance(m, _NORMS):
            return "norm"
        if isinstance(m, _UNARY_MODULES):
            return "unary"
        if isinstance(m, nn.Flatten) and _is_flatten(node, modules):
            return "flatten"
        return "opaque"
    if node.op == "call_function":
        if node.target in _UNARY_FUNCTIONS and len(_tensor_args(node)) == 1:
            return "unary"
        if node.target in _ADD:
            ins = _tensor_args(node)
            if len(ins) == 2 and _shape(ins[0]) == _shape(ins[1]) == _shape(node) and not node.kwargs.get("alpha"):
                return "add"
            return "opaque"
        if _is_flatten(node, modules):
            return "flatten"
        return "opaque"
    if node.op == "call_method":
        if node.target in _UNARY_METHODS and len(_tensor_args(node)) == 1:
            return "unary"
        if node.target in ("add", "add_") and len(_tensor_args(node)) == 2:
            ins = _tensor_args(node)
            if _shape(ins[0]) == _shape(ins[1]) == _shape(node) and len(node.args) == 2 and not node.kwargs:
                return "add"
        if _is_flatten(node, modules):
            return "flatten"
    return "opaque"


class _Analysis:
    def __init__(self, gm: fx.GraphModule, masks: dict[str, Tensor], fold: bool, training: bool):
        self.gm, self.masks, self.fold, self.training = gm, masks, fold, training
        self.modules = dict(gm.named_modules())
        calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        self.kind: dict[fx.Node, str] = {}
        self.spaces = _Spaces()
        self.factor: dict[fx.Node, int] = {}  # features per channel (flatten: H*W)
        self.fixed: set[fx.Node] = set()  # space roots that keep every channel (resolved later)
        fixed_members: list[fx.Node] = []
        for n in gm.graph.nodes:
            if _shape(n) is None or len(_shape(n)) < 2:
                continue
            k = self.kind[n] = _classify(n, self.modules, calls) if n.op not in ("placeholder", "get_attr", "output") \
                else "opaque"
            ins = _tensor_args(n)
            self.factor[n] = 1
            if k in ("norm", "unary", "depthwise", "add", "flatten"):
                if any(i not in self.kind for i in ins):
                    self.kind[n] = "opaque"
                    fixed_members.append(n)
                    continue
                facs = {self.factor[i] for i in ins}
                if len(facs) != 1:
                    self.kind[n] = "opaque"
                    fixed_members.append(n)
                    continue
                self.factor[n] = facs.pop() * (_shape(ins[0])[2:].numel() if k == "flatten" else 1)
                for i in ins:
                    self.spaces.union(n, i)
            elif k == "layer":
                self.spaces.find(n)
            else:
                fixed_members.append(n)
        self.fixed_members = fixed_members
        self.readers_all: set[fx.Node] = set()  # nodes read by something that needs every channel
        for n in gm.graph.nodes:
            k = self.kind.get(n)
            if n.op == "output" or k == "opaque" or k is None:
                for i in n.all_input_nodes:
                    if i in self.kind:
                        self.readers_all.add(i)
        self._values()

    # -- layer helpers
    def module(self, n: fx.Node) -> nn.Module:
        return self.modules[n.target]

    def mask(self, n: fx.Node) -> Tensor:
        m = self.module(n)
        name = f"{n.target}.weight"
        mask = self.masks.get(name)
        if mask is None:
            mask = m.weight.detach() != 0
        return mask.to("cpu", torch.bool)

    def channels(self, n: fx.Node) -> int:
        return _shape(n)[1] // self.factor[n]

    # -- what every channel is: zero, a known constant, or variable
    def _values(self) -> None:
        self.val: dict[fx.Node, tuple[Tensor, Tensor]] = {}
        for n in self.gm.graph.nodes:
            k = self.kind.get(n)
            if k is None:
                continue
            c = self.channels(n)
            var = (torch.full((c,), VAR, dtype=torch.int8), torch.zeros(c))
            ins = _tensor_args(n)
            if k == "layer":
                m, mask = self.module(n), self.mask(n)
                dead = ~mask.reshape(mask.shape[0], -1).any(1)
                kinds = torch.where(dead, torch.tensor(ZERO, dtype=torch.int8), torch.tensor(VAR, dtype=torch.int8))
                vals = torch.zeros(c)
                if m.bias is not None:
                    b = m.bias.detach().cpu().float()
                    if self.training:
                        kinds = torch.where(dead & (b != 0), torch.tensor(VAR, dtype=torch.int8), kinds)
                        kinds[dead] = VAR  # a trainable bias is a variable during training
                    else:
                        kinds = torch.where(dead & (b != 0), torch.tensor(CONST, dtype=torch.int8), kinds)
                        vals = torch.where(dead, b, vals)
                self.val[n] = (kinds, vals)
            elif k == "depthwise":
                m, mask = self.module(n), self.mask(n)
                ik, _ = self.val[ins[0]]
                dead = ~mask.reshape(c, -1).any(1) | (ik == ZERO)
                kinds = torch.where(dead, torch.tensor(ZERO, dtype=torch.int8), torch.tensor(VAR, dtype=torch.int8))
                vals = torch.zeros(c)
                if m.bias is not None:
                    b = m.bias.detach().cpu().float()
                    if self.training:
                        kinds[dead] = VAR
                    else:
                        kinds = torch.where(dead & (b != 0), torch.tensor(CONST, dtype=torch.int8), kinds)
                        vals = torch.where(dead, b, vals)
                self.val[n] = (kinds, vals)
            elif k in ("norm", "unary"):
                self.val[n] = self._through(n, ins[0])
            elif k == "add":
                (ka, va), (kb, vb) = self.val[ins[0]], self.val[ins[1]]
                kinds = torch.maximum(ka, kb)
                s = va + vb
                kinds = torch.where((kinds == CONST) & (s == 0), torch.tensor(ZERO, dtype=torch.int8), kinds)
                self.val[n] = (kinds, s)
            elif k == "flatten":
                self.val[n] = self.val[ins[0]]
            else:
                self.val[n] = var

    def _through(self, n: fx.Node, src: fx.Node) -> tuple[Tensor, Tensor]:
        """Runs a channel-wise op on a tensor holding each channel's constant, to see what it makes of it."""
        kinds, vals = self.val[src]
        out_kinds = torch.full_like(kinds, VAR)
        known = kinds != VAR
        if not bool(known.any()):
            return out_kinds, torch.zeros_like(vals)
        if self.training:
            module = self.module(n) if n.op == "call_module" else None
            trainable = module is not None and (isinstance(module, _NORMS) or isinstance(module, _DROPOUT))
            if trainable:
                return out_kinds, torch.zeros_like(vals)  # batch statistics, affine parameters, random drops
        shape = list(_shape(src))
        shape[0] = 1
        dtype = src.meta["tensor_meta"].dtype
        x = vals.to(dtype).repeat_interleave(self.factor[src]).view(1, -1, *([1] * (len(shape) - 2))).expand(shape)
        x = x.contiguous()
        with torch.no_grad():
            if n.op == "call_module":
                m = copy.deepcopy(self.module(n)).eval()
                y = m(x)
            else:
                args = [x if a is src else a for a in n.args]
                kwargs = dict(n.kwargs)
                if n.op == "call_function":
                    y = n.target(*args, **kwargs)
                else:
                    y = getattr(x, n.target)(*args[1:], **kwargs)
        c = self.channels(n)
        flat = y.reshape(1, c, -1)
        lo, hi = flat.amin(2)[0], flat.amax(2)[0]
        const = known & (lo == hi)  # spatially constant (padding would break this: then it stays VAR)
        out_kinds = torch.where(const, torch.tensor(CONST, dtype=torch.int8), out_kinds)
        out_kinds = torch.where(const & (lo == 0), torch.tensor(ZERO, dtype=torch.int8), out_kinds)
        return out_kinds, torch.where(const, lo, torch.zeros_like(lo)).to(vals.dtype)

    # -- which channels must stay
    def foldable(self, reader: fx.Node) -> bool:
        if not self.fold or self.kind.get(reader) != "layer":
            return False
        m = self.module(reader)
        # Linear and unpadded convolutions absorb a constant channel in their bias; padded ones in a
        # constant output map (the constant convolved with the zero-padded kernel), see _constant_map.
        return isinstance(m, nn.Linear) or m.groups == 1

    def solve(self) -> dict[fx.Node, Tensor]:
        roots = {self.spaces.find(n) for n in self.kind}
        members: dict[fx.Node, list[fx.Node]] = {r: [] for r in roots}
        for n in self.kind:
            members[self.spaces.find(n)].append(n)
        fixed = {self.spaces.find(n) for n in self.fixed_members} | {self.spaces.find(n) for n in self.readers_all}
        keep = {r: torch.ones(self.channels(members[r][0]), dtype=torch.bool) for r in roots}
        changed = True
        while changed:
            changed = False
            for r in roots:
                if r in fixed:
                    continue
                need = torch.zeros_like(keep[r])
                for n in members[r]:
                    kinds, _ = self.val[n]
                    for user in n.users:
                        if self.kind.get(user) != "layer":
                            continue  # members of this space read nothing; others are 'readers_all'
                        active = self.reads(user, keep)
                        wanted = (kinds == VAR) | ((kinds == CONST) & (not self.foldable(user)))
                        need |= active & wanted
                if not bool(need.any()):
                    need[0] = True  # keep a channel so no layer becomes empty; exact either way
                if not torch.equal(need, keep[r]):
                    keep[r], changed = need, True
        self.members = members
        return {n: keep[self.spaces.find(n)] for n in self.kind}

    def reads(self, layer: fx.Node, keep: dict[fx.Node, Tensor]) -> Tensor:
        """Per input channel of ``layer``: whether an active weight of a kept output reads it."""
        mask = self.mask(layer)
        out_keep = keep[self.spaces.find(layer)]
        src = _tensor_args(layer)[0]
        per_feature = mask[out_keep].reshape(int(out_keep.sum()), mask.shape[1], -1).any(2).any(0)
        return per_feature.view(-1, self.factor[src]).any(1)


# ----------------------------------------------------------------------------------------------
# rebuild


def _example(model: nn.Module, example_input: Optional[Tensor]) -> Tensor:
    if example_input is not None:
        return example_input
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("example_input is required (a tensor of one input batch) when the model has no input_shape")
    p = next(model.parameters())
    return torch.zeros(2, *shape, device=p.device, dtype=p.dtype)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)`` with one clear error for untraceable models."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ... for dynamic code
        raise TraceError(
            f"compact: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); models with "
            "data-dependent control flow cannot be compacted (wrap the dynamic part in a leaf module)"
        ) from e
    _dropout_as_modules(gm)
    return gm


_DROPOUT_FUNCTIONS = {F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
                      F.dropout3d: nn.Dropout3d}


def _dropout_as_modules(gm: fx.GraphModule) -> None:
    """``F.dropout(x, p, training=self.training)`` is traced with the mode of the moment baked in;
    an ``nn.Dropout`` module follows ``.train()`` / ``.eval()`` of the compact model instead."""
    for i, node in enumerate(list(gm.graph.nodes)):
        cls = _DROPOUT_FUNCTIONS.get(node.target) if node.op == "call_function" else None
        if cls is None:
            continue
        args = list(node.args) + [None] * 4
        p = node.kwargs.get("p", args[1] if args[1] is not None else 0.5)
        name = f"_dropout_{i}"
        gm.add_submodule(name, cls(p=float(p)))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _expand(keep: Tensor, factor: int) -> Tensor:
    return keep.repeat_interleave(factor).nonzero().squeeze(1)


@torch.no_grad()
def compact(
    model: nn.Module,
    sparsifier: Any = None,
    example_input: Optional[Tensor] = None,
    fold_constants: Optional[bool] = None,
    check: bool = True,
) -> fx.GraphModule:
    """A physically smaller copy of ``model`` that computes the same function as the masked model.

    Removes empty output channels, input channels no active weight reads, and the matching
    channels of BatchNorm layers, activations, residual additions, depthwise convolutions and the
    features a flatten feeds into a Linear layer (see the module docstring for the rules and why
    they are exact). Sparse Momentum (Dettmers & Zettlemoyer 2019), Sec. 5 / Table 3: the "dense
    convolution" speedup of removing empty channels, realized.

    Args:
        model: any ``torch.fx``-traceable module; left unchanged.
        sparsifier: its ``masks`` (by full parameter name) say which weights are active; without it,
            a weight is active where it is nonzero.
        example_input: one input batch, for the tensor shapes (default: zeros of
            ``model.input_shape`` when the model has that attribute).
        fold_constants: fold removed constant channels into the next layer's bias; default: only
            when ``model`` is in eval mode (inference). Never in training mode.
        check: run both models on ``example_input`` and raise if their outputs differ.

    Returns:
        An ``fx.GraphModule`` with the original parameter names; its ``compaction`` attribute is the
        :class:`Compaction` record (index of what was kept, restricted masks, optimizer transfer).

    Raises:
        TraceError: the model cannot be traced.
    """
    training = model.training
    fold = (not training) if fold_constants is None else bool(fold_constants)
    if fold and training:
        raise ValueError("fold_constants=True needs the model in eval mode (constants depend on trainable parameters)")
    example = _example(model, example_input)
    gm = trace(model)
    gm.train(training)
    was = gm.training
    gm.eval()  # shape propagation must not update BatchNorm statistics
    ShapeProp(gm).propagate(example)
    gm.train(was)
    masks = dict(getattr(sparsifier, "masks", {}) or {})
    an = _Analysis(gm, masks, fold, training)
    keep = an.solve()

    new = copy.deepcopy(gm)
    record = Compaction()
    new_modules = dict(new.named_modules())
    for n in gm.graph.nodes:
        k = an.kind.get(n)
        if k not in ("layer", "depthwise", "norm") or n.op != "call_module":
            continue
        m = an.module(n)
        out_keep = keep[n].nonzero().squeeze(1)
        if k == "norm":
            if bool(keep[n].all()):
                continue
            _slice_norm(new_modules[n.target], out_keep, n.target, record)
            continue
        src = _tensor_args(n)[0]
        if k == "depthwise":
            in_keep = None
        else:
            in_keep = _expand(keep[src], an.factor[src]) if src in keep else None
            if in_keep is not None and in_keep.numel() == m.weight.shape[1]:
                in_keep = None
        if bool(keep[n].all()):
            out_keep = None
        fold_bias = _folded_bias(an, n, src, keep) if k == "layer" else None
        fold_map = _constant_map(an, n, src, keep) if k == "layer" else None
        if fold_map is not None:
            _add_after(new, n.name, _AddConstantMap(fold_map if out_keep is None or bool(keep[n].all())
                                                    else fold_map.index_select(1, out_keep)))
            record.folded.append(n.target)
        if out_keep is None and in_keep is None and fold_bias is None:
            continue
        _slice_layer(new_modules[n.target], n.target, out_keep, in_keep, fold_bias, masks, an.mask(n), record, k)
    for name, p in new.named_parameters():
        if name not in record.index and name in masks:
            record.masks[name] = masks[name].detach().clone()
    new.compaction = record
    if check:
        _check_same(model, new, example)
    return new


def _padded(m: nn.Module) -> bool:
    return not isinstance(m, nn.Linear) and (isinstance(m.padding, str) or any(p != 0 for p in m.padding))


class _AddConstantMap(nn.Module):
    """Adds the fixed output of removed constant input channels (a folded padded convolution)."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, y: Tensor) -> Tensor:
        if y.shape[1:] != self.value.shape[1:]:
            raise ValueError(
                f"this compact model folded constant channels for outputs of shape {tuple(self.value.shape[1:])} "
                f"(the example input's size); got {tuple(y.shape[1:])}: compact again with an example of this size"
            )
        return y + self.value


def _constant_map(an: _Analysis, n: fx.Node, src: fx.Node, keep: dict) -> Optional[Tensor]:
    """Output of a padded convolution on its removed constant input channels alone (eval mode only).

    With zero padding a constant channel is not constant at the borders, so its contribution is not a
    bias but a fixed map: the constant image convolved with those kernels, exact for the example
    input's size (the map's forward checks it).
    """
    m = an.module(n)
    if not an.foldable(n) or not _padded(m) or src not in keep:
        return None
    kinds, vals = an.val[src]
    gone_const = (~keep[src]) & (kinds == CONST)
    if not bool(gone_const.any()):
        return None
    w = (m.weight.detach() * an.mask(n).to(m.weight.device))[:, gone_const]
    spatial = _shape(src)[2:]
    x = vals[gone_const].to(w.device, w.dtype).view(1, -1, *([1] * len(spatial))).expand(1, -1, *spatial)
    with torch.no_grad():
        return m._conv_forward(x.contiguous(), w, None).detach()


def _add_after(gm: fx.GraphModule, node_name: str, module: nn.Module) -> None:
    node = next(nd for nd in gm.graph.nodes if nd.name == node_name)
    name = f"_folded_{node_name}"
    gm.add_submodule(name, module)
    users = list(node.users)
    with gm.graph.inserting_after(node):
        added = gm.graph.call_module(name, (node,))
    for u in users:
        u.replace_input_with(node, added)
    gm.recompile()


def _folded_bias(an: _Analysis, n: fx.Node, src: fx.Node, keep: dict) -> Optional[Tensor]:
    """``sum_c W[o, c] * value_c`` over removed constant input channels (eval mode only)."""
    if not an.foldable(n) or src not in keep or _padded(an.module(n)):
        return None
    kinds, vals = an.val[src]
    gone_const = (~keep[src]) & (kinds == CONST)
    if not bool(gone_const.any()):
        return None
    m = an.module(n)
    w = (m.weight.detach() * an.mask(n).to(m.weight.device)).float()
    f = an.factor[src]
    per_channel = w.reshape(w.shape[0], -1, f, *w.shape[2:]).sum(dim=tuple(range(2, w.dim() + 1)))  # (O, C)
    return (per_channel[:, gone_const] * vals[gone_const].to(w.device)).sum(1)


def _param(t: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().to(like.dtype), requires_grad=like.requires_grad)


def _slice_layer(m: nn.Module, name: str, out_keep, in_keep, fold_bias, masks, mask, record: Compaction, kind: str) -> None:
    w = m.weight
    dims = [out_keep, in_keep] + [None] * (w.dim() - 2)
    if kind == "depthwise":
        dims = [out_keep] + [None] * (w.dim() - 1)
    new_w = w.detach()
    for d, idx in enumerate(dims):
        if idx is not None:
            new_w = new_w.index_select(d, idx.to(w.device))
    record.index[f"{name}.weight"] = (f"{name}.weight", dims)
    old_mask = masks.get(f"{name}.weight")
    if old_mask is not None:
        sl = old_mask
        for d, idx in enumerate(dims):
            if idx is not None:
                sl = sl.index_select(d, idx.to(sl.device))
        record.masks[f"{name}.weight"] = sl.clone()
    m.weight = _param(new_w, w)
    bias = m.bias.detach() if m.bias is not None else None
    if fold_bias is not None:
        bias = (bias if bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)) + fold_bias.to(w.dtype)
        record.folded.append(name)
    if bias is not None:
        if out_keep is not None:
            bias = bias.index_select(0, out_keep.to(bias.device))
        if m.bias is not None:
            record.index[f"{name}.bias"] = (f"{name}.bias", [out_keep])
            m.bias = _param(bias, m.bias)
        else:
            m.bias = nn.Parameter(bias.clone())
    n_out, n_in = new_w.shape[0], new_w.shape[1]
    record.removed[name] = {"out": w.shape[0] - n_out, "in": (w.shape[1] - n_in) if kind == "layer" else w.shape[0] - n_out}
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = n_out, n_in
    else:
        m.out_channels = n_out
        m.in_channels = n_out if kind == "depthwise" else n_in
        if kind == "depthwise":
            m.groups = n_out


def _slice_norm(m: nn.Module, keep: Tensor, name: str, record: Compaction) -> None:
    for attr in ("weight", "bias"):
        p = getattr(m, attr)
        if p is not None:
            setattr(m, attr, _param(p.detach().index_select(0, keep.to(p.device)), p))
            record.index[f"{name}.{attr}"] = (f"{name}.{attr}", [keep])
    for attr in ("running_mean", "running_var"):
        b = getattr(m, attr)
        if b is not None:
            setattr(m, attr, b.index_select(0, keep.to(b.device)).clone())
    record.removed[name] = {"out": m.num_features - keep.numel(), "in": m.num_features - keep.numel()}
    m.num_features = keep.numel()


def _check_same(model: nn.Module, new: nn.Module, example: Tensor) -> None:
    a, b = copy.deepcopy(model).eval(), copy.deepcopy(new).eval()
    ya, yb = a(example), b(example)
    ya, yb = (ya if torch.is_tensor(ya) else ya[0]), (yb if torch.is_tensor(yb) else yb[0])
    scale = ya.abs().max().clamp_min(1.0)
    if ya.shape != yb.shape or not torch.allclose(ya, yb, atol=1e-4 * float(scale), rtol=1e-4):
        raise RuntimeError(
            "compact: the compact model's output differs from the masked model's on the example input "
            f"(max difference {float((ya - yb).abs().max()) if ya.shape == yb.shape else 'shape'}); please report this model"
        )


def compact_for_training(model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Any,
                         example_input: Optional[Tensor] = None):
    """Compacts a model in training mode and carries its optimizer state and fixed masks over.

    For the end of a pruning era (Starfire Sec. 2: the mask is fixed afterwards): returns
    ``(new_model, new_optimizer, masks)`` where ``masks`` are the old masks restricted to the kept
    weights, keyed by the new parameter names (the same names); attach them to a static sparsifier of
    the new model (e.g. ``Sparsifier(new_model, new_optimizer, init="dense")`` then ``set_mask``).
    """
    if not model.training:
        raise ValueError("compact_for_training needs the model in training mode (model.train())")
    new = compact(model, sparsifier, example_input)
    return new, new.compaction.optimizer(optimizer, model, new), new.compaction.masks
