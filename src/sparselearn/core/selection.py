"""Which parameters are sparse.

By default the ``weight`` of every Linear and Conv1d/2d/3d module is sparse; biases and
normalisation weights stay dense (Sparse Momentum, Section 4: "we keep biases and batch
normalization weights dense"). Selection can be narrowed or widened by module type and by
parameter-name patterns; tied weights (one Parameter reachable under several names) are counted
once, under the first name ``named_modules`` reaches.

Transformers (what counts as a linear layer when ``nn.Linear`` is among the sparse types):

* the projections of ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight`` when
  the key and value sizes differ; ``out_proj`` is an ``nn.Linear``);
* *transposed linears*, whose weight is stored ``(in, out)``: Hugging Face's
  ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections), recognised by class name and module
  so the core never imports ``transformers``, and any class passed to
  :func:`register_transposed_linear`. The rules see them in ``(out, in)`` orientation
  (:class:`~sparselearn.core.layer.LayerSlot`);
* embeddings stay dense, and so does a weight tied to one (a language model's ``lm_head`` that
  shares the token embedding's Parameter), unless ``include_embeddings=True``; norms (LayerNorm,
  RMSNorm) and biases are not weights of a linear module and stay dense.

*Fused projections* hold several layers in one weight: ``nn.MultiheadAttention``'s
``in_proj_weight`` is ``[W_q; W_k; W_v]`` stacked along the output axis, GPT-2's ``c_attn`` is a
``Conv1D`` of ``(d, 3d)``. Their blocks are separate layers for the per-layer density allocation
and the per-layer prune / regrow decisions (so the query, key and value projections each keep
their own share, exactly as unfused ones would), while the mask stays one tensor keyed by the
parameter's name. The rules in :data:`FUSED_RULES` say which parameters are fused; a module can
also declare ``fused_blocks = ("q", "k", "v")`` (labels of equal blocks along its weight's output
axis).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from torch import nn

from .layer import LayerSlot

DEFAULT_SPARSE_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
#: (module, class name) of the transposed-linear classes known without importing their library.
_TRANSPOSED_BY_NAME = {("transformers.pytorch_utils", "Conv1D")}
_TRANSPOSED_TYPES: set[type] = set()
_MHA_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
QKV = ("q", "k", "v")


def register_transposed_linear(cls: type) -> type:
    """Declares that ``cls.weight`` is a linear weight stored ``(in, out)`` (``y = x @ W + b``), so
    its modules are sparse like ``nn.Linear`` and read in ``(out, in)`` orientation. Usable as a
    class decorator; returns ``cls``."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_transposed_linear needs an nn.Module subclass, got {cls!r}")
    _TRANSPOSED_TYPES.add(cls)
    return cls


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module``'s ``weight`` is a linear weight stored ``(in, out)``: HF ``Conv1D`` (by
    class name and module, no import) or a class registered with :func:`register_transposed_linear`."""
    return any(c in _TRANSPOSED_TYPES or (c.__module__, c.__name__) in _TRANSPOSED_BY_NAME
               for c in type(module).__mro__)


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transposed linear (HF ``Conv1D``): a fully connected layer, whose
    weight the rules read as ``(out, in)``."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def _mha_in_proj(name: str, module: nn.Module, parent, p_name: str):
    if isinstance(module, nn.MultiheadAttention) and p_name == "in_proj_weight":
        return QKV
    return None


def _declared(name: str, module: nn.Module, parent, p_name: str):
    blocks = getattr(module, "fused_blocks", None)
    return tuple(blocks) if blocks and p_name == "weight" else None


def _gpt2_c_attn(name: str, module: nn.Module, parent, p_name: str):
    """GPT-2's ``c_attn``: a ``Conv1D`` of ``(d, 3d)`` holding ``[q | k | v]`` along the output axis
    (``(d, 2d)``, ``[k | v]``, in a cross-attention block, whose ``q_attn`` is separate)."""
    if p_name != "weight" or not name.endswith("c_attn") or not is_transposed_linear(module):
        return None
    if parent is None or not type(parent).__name__.startswith("GPT2"):
        return None
    d_in, d_out = module.weight.shape
    return {3 * d_in: QKV, 2 * d_in: QKV[1:]}.get(d_out)


#: Rules ``rule(module_name, module, parent_module, param_name) -> labels or None`` that say a
#: parameter is a fused projection of ``len(labels)`` equal blocks along its output axis. The
#: first rule that answers wins; append your own for other architectures (check that the layout
#: really is blocked: GPT-NeoX's ``query_key_value`` interleaves q, k, v per head and is not).
FUSED_RULES: list[Callable] = [_mha_in_proj, _declared, _gpt2_c_attn]


@dataclass(frozen=True)
class SparseParam:
    """A selected parameter: its full name, the Parameter, and the module that owns it.

    ``transposed``: the weight is stored ``(in, out)``; ``blocks``: labels of the equal blocks of
    a fused projection along the output axis (empty: one layer).
    """

    name: str
    param: nn.Parameter
    module: nn.Module
    transposed: bool = False
    blocks: tuple[str, ...] = ()

    def slots(self) -> list[LayerSlot]:
        """The layers this parameter is: itself, or one per block of a fused projection."""
        # a layer that is not the parameter as stored has a name of its own, so a mask shaped like
        # the layer is never taken for one shaped like the parameter (a square Conv1D)
        base = f"{self.name}.T" if self.transposed else self.name
        if len(self.blocks) < 2:
            return [LayerSlot(base, self.name, self.transposed)]
        return [LayerSlot(f"{base}[{label}]", self.name, self.transposed, i, len(self.blocks))
                for i, label in enumerate(self.blocks)]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _as_patterns(value, arg: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(str(v) for v in value)
    except TypeError:
        raise TypeError(f"{arg} must be a name pattern or a sequence of patterns, got {value!r}") from None


def candidate_parameters(
    model: nn.Module,
    sparse_types: Sequence[type] = DEFAULT_SPARSE_TYPES,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    include_embeddings: bool = False,
    split_fused: bool = True,
) -> list[SparseParam]:
    """Parameters eligible for sparsity, in module order, tied weights once.

    Args:
        model: any module.
        sparse_types: module types whose ``weight`` is sparse; with ``nn.Linear`` among them, the
            transposed linears and ``nn.MultiheadAttention``'s projections are linear layers too.
        include: extra parameter-name patterns (``fnmatch``, e.g. ``"*.embedding.weight"``) made
            sparse whatever their module type.
        exclude: parameter-name patterns kept dense even if selected otherwise.
        include_embeddings: make the weights of ``nn.Embedding`` / ``nn.EmbeddingBag`` sparse (and a
            weight tied to one); by default they stay dense.
        split_fused: read fused projections (:data:`FUSED_RULES`) as one layer per block.
    """
    inc, exc = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    all_names = [n for n, _ in model.named_parameters()]
    check_patterns_match(inc, all_names, "include")
    check_patterns_match(exc, all_names, "exclude")
    types = tuple(sparse_types)
    linear = nn.Linear in types
    if include_embeddings:
        types += _EMBEDDING_TYPES
    # a Parameter an embedding owns stays dense under every name it has (a tied lm_head)
    embedded = set() if include_embeddings else {
        id(m.weight) for m in model.modules() if isinstance(m, _EMBEDDING_TYPES)}
    modules = dict(model.named_modules())
    seen: set[int] = set()
    out: list[SparseParam] = []
    for mod_name, module in modules.items():
        transposed = linear and is_transposed_linear(module)
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            by_type = ((isinstance(module, types) or transposed) and p_name == "weight") or (
                linear and isinstance(module, nn.MultiheadAttention) and p_name in _MHA_PROJECTIONS)
            by_type = by_type and id(p) not in embedded
            if not (by_type or _matches(full, inc)) or _matches(full, exc):
                continue
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.requires_grad:
                # a frozen parameter cannot regrow what a mask removes: it stays dense
                if _matches(full, inc):
                    raise ValueError(f"include={include!r} selects {full}, which is frozen (requires_grad=False)")
                continue
            blocks = _fused_blocks(mod_name, module, modules, p_name, p, transposed) if split_fused else ()
            out.append(SparseParam(full, p, module, transposed and p_name == "weight", blocks))
    return out


def _fused_blocks(mod_name: str, module: nn.Module, modules: dict, p_name: str, p, transposed: bool) -> tuple:
    parent = modules.get(mod_name.rpartition(".")[0]) if mod_name else None
    for rule in FUSED_RULES:
        labels = rule(mod_name, module, parent, p_name)
        if labels:
            out_dim = p.shape[1] if transposed else p.shape[0]
            if p.dim() < 2 or out_dim % len(labels):
                raise ValueError(f"{mod_name}.{p_name} of shape {tuple(p.shape)} is declared fused into "
                                 f"{len(labels)} blocks, which do not divide its output axis evenly")
            return tuple(str(x) for x in labels)
    return ()


def check_patterns_match(patterns: Sequence[str], names: Sequence[str], arg: str) -> None:
    """Raises ``ValueError`` for a name pattern that matches none of ``names`` (a typo, or a
    ``torch.compile`` prefix), listing a few of the names there are."""
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            shown = ", ".join(list(names)[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"{arg} pattern {pat!r} matches no parameter; the parameters are: {shown}")


def is_downsampling_conv(module: nn.Module) -> bool:
    """A convolution that reduces the spatial size through a 1x1 kernel with stride > 1.

    These are the shortcut ("downsampling") convolutions that DSR (Mostafa & Wang, 2019) and the
    partially dense setting of Sparse Momentum (Section 4) keep dense.
    """
    if not isinstance(module, _CONV_TYPES):
        return False
    return all(k == 1 for k in module.kernel_size) and any(s > 1 for s in module.stride)


def partially_dense_names(params: Sequence[SparseParam], dense_last: bool) -> list[str]:
    """Names kept dense in the partially dense setting (Sparse Momentum, Section 4).

    The first convolution, the downsampling convolutions and, if ``dense_last``, the last Linear layer.
    """
    names: list[str] = []
    convs = [sp for sp in params if isinstance(sp.module, _CONV_TYPES)]
    if convs:
        names.append(convs[0].name)
    names += [sp.name for sp in convs if is_downsampling_conv(sp.module) and sp.name not in names]
    if dense_last:
        linears = [sp for sp in params if isinstance(sp.module, nn.Linear)]
        if linears and linears[-1].name not in names:
            names.append(linears[-1].name)
    return names
