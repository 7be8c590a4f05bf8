"""Which parameters are sparse.

By default the ``weight`` of every Linear and Conv1d/2d/3d module is sparse; biases and
normalisation weights stay dense (Sparse Momentum, Section 4: "we keep biases and batch
normalization weights dense"). Selection can be narrowed or widened by module type and by
parameter-name patterns; tied weights (one Parameter reachable under several names) are counted
once, under the first name ``named_modules`` reaches.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

DEFAULT_SPARSE_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class SparseParam:
    """A selected parameter: its full name, the Parameter, and the module that owns it."""

    name: str
    param: nn.Parameter
    module: nn.Module


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
) -> list[SparseParam]:
    """Parameters eligible for sparsity, in module order, tied weights once.

    Args:
        model: any module.
        sparse_types: module types whose ``weight`` is sparse.
        include: extra parameter-name patterns (``fnmatch``, e.g. ``"*.embedding.weight"``) made
            sparse whatever their module type.
        exclude: parameter-name patterns kept dense even if selected otherwise.
    """
    inc, exc = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    all_names = [n for n, _ in model.named_parameters()]
    check_patterns_match(inc, all_names, "include")
    check_patterns_match(exc, all_names, "exclude")
    seen: set[int] = set()
    out: list[SparseParam] = []
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            by_type = isinstance(module, tuple(sparse_types)) and p_name == "weight"
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
            out.append(SparseParam(full, p, module))
    return out


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
