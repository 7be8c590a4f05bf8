"""Export of a sparse model: compact dense file, ``torch.sparse`` state dict, ONNX of the compact model.

* ``compact``: :func:`sparselearn.speed.compact` of the model (eval mode, constants folded), saved as a
  ``torch.export`` program with a dynamic batch dimension (``.pt2``; load with
  ``torch.export.load(path).module()``, no sparselearn or model code needed). Not a pickled
  ``GraphModule``: its generated code refers to the original model class, which a standalone file
  cannot carry.
* ``sparse``: the state dict with every masked weight as a ``torch.sparse`` tensor (CSR for Linear
  weights, COO for convolutions) and the masks dropped (the sparsity pattern is the tensor's index);
  ``torch.load(path)`` then ``{k: v.to_dense() if v.is_sparse or v.layout != torch.strided else v}``.
* ``onnx``: the compact model through ``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``,
  dynamic batch), checked against onnxruntime on the example input before the call returns.

Every export reports its file size against the dense ``state_dict`` file.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .compact import compact

FORMATS = ("compact", "sparse", "onnx")


class _Masks:
    def __init__(self, masks: dict[str, Tensor]):
        self.masks = masks


def _dense_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def sparse_state_dict(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """``model.state_dict()`` with each masked weight stored as a sparse tensor of its active entries."""
    out = {}
    for name, t in model.state_dict().items():
        mask = masks.get(name)
        if mask is None:
            out[name] = t
            continue
        w = (t * mask.to(t.device)).detach().cpu()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known; the round trip is tested
            warnings.simplefilter("ignore", UserWarning)
            out[name] = w.to_sparse_csr() if w.dim() == 2 else w.to_sparse()
    return out


def export(model: nn.Module, format: str, path: str | os.PathLike, masks: Optional[dict[str, Tensor]] = None,
           example_input: Optional[Tensor] = None, atol: float = 1e-4) -> dict[str, Any]:
    """Writes ``model`` (masked by ``masks``, full parameter names) to ``path`` in ``format``.

    Args:
        model: the trained model (its weights already masked); set to eval mode for the export.
        format: ``"compact"``, ``"sparse"`` or ``"onnx"`` (see the module docstring).
        path: output file.
        masks: bool masks by parameter name (a sparsifier's ``masks``); default: nonzero weights.
        example_input: one input batch (default zeros of ``model.input_shape``, batch 2).
        atol: tolerance of the onnxruntime check.

    Returns:
        ``{"format", "path", "bytes", "dense_bytes", "ratio"}`` and for ONNX ``"max_abs_diff"``.

    Raises:
        ValueError: unknown format; ImportError: ``onnx`` / ``onnxruntime`` missing for ``"onnx"``
        (``pip install "sparselearn[export]"``); RuntimeError: onnxruntime disagrees with torch.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if masks is None:
        masks = {n: p.detach() != 0 for n, p in model.named_parameters()
                 if n.endswith("weight") and p.dim() > 1}
    was = model.training
    model.eval()
    try:
        if example_input is None:
            shape = getattr(model, "input_shape", None)
            if shape is None:
                raise ValueError("example_input is required when the model has no input_shape attribute")
            p = next(model.parameters())
            example_input = torch.zeros(2, *shape, dtype=p.dtype, device=p.device)
        info: dict[str, Any] = {"format": format, "path": str(path), "dense_bytes": _dense_bytes(model)}
        if format == "sparse":
            torch.save(sparse_state_dict(model, masks), path)
        else:
            small = compact(model, _Masks(masks), example_input)
            if format == "compact":
                program = torch.export.export(small, (example_input,),
                                              dynamic_shapes=({0: torch.export.Dim.AUTO},))
                torch.export.save(program, str(path))
            else:
                info["max_abs_diff"] = _onnx(small, example_input, path, atol)
    finally:
        model.train(was)
    info["bytes"] = path.stat().st_size
    info["ratio"] = info["bytes"] / info["dense_bytes"]
    return info


def _onnx(model: nn.Module, x: Tensor, path: Path, atol: float) -> float:
    try:
        import onnxruntime as ort  # noqa: F401  (checked first: the export alone would be unverified)
        import onnx  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxruntime: pip install 'sparselearn[export]' ({e})") from None
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript
        # (one more dependency); this one is kept because every export is checked with onnxruntime below.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).detach().cpu().numpy()
    got = session.run(None, {"input": x.detach().cpu().numpy()})[0]
    diff = float(abs(ref - got).max())
    if not diff <= atol * max(1.0, float(abs(ref).max())):
        raise RuntimeError(f"onnxruntime output differs from torch by {diff:g} (tolerance {atol:g})")
    return diff
