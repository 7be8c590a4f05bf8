"""How a sparse network's topology moves during training, update by update.

Neither paper plots this, but both algorithms' claims rest on it: Sparse Momentum (Section 3)
moves weights between layers by their mean momentum (the redistribution shares) and regrows where
momentum is large; the in-time over-parameterisation view of dynamic sparse training asks how many
of all weights were ever active at some point (Liu et al., 2021, "ITOP rate"). The tracker records,
per topology update and sparse layer: weights pruned and regrown, the mask turnover, the layer's
share of all regrown weights, empty output channels, and the fraction of weights ever activated.

A weight pruned and regrown in the same update (allowed by Sparse Momentum and RigL) is simply kept,
so it counts as neither: the tracker compares the masks before and after each update.
"""
from __future__ import annotations

from typing import Any, Optional


class TopologyTracker:
    """Statistics of every topology update of a sparsifier.

    Attaches through ``sparsifier.register_update_hook``; its state (the last masks seen, the
    ever-active masks and the records) is a ``state_dict``, so it is checkpointed with the run.

    Args:
        sparsifier: a :class:`sparselearn.core.sparsifier.Sparsifier` (only its ``masks``,
            ``layers()``, ``step_count`` and ``register_update_hook`` are used).

    Attributes:
        records: one dict per update: ``{"step", "pruned", "regrown", "active", "total", "ever_active",
            "itop", "layers": {name: {...}}}``; per layer ``pruned``, ``regrown``, ``active``,
            ``turnover`` (regrown / active weights after the update), ``regrow_share`` (the layer's
            share of all regrown weights), ``empty_out`` (output channels without a weight) and
            ``itop`` (fraction of the layer's weights active at any time since attaching).

    Example::

        tracker = TopologyTracker(sparsifier)
        ...train...
        tracker.records[-1]["itop"]          # fraction of all sparse weights ever used
        torch.save({"tracker": tracker.state_dict(), ...}, path)
    """

    def __init__(self, sparsifier):
        self.sparsifier = sparsifier
        self._last = {k: m.detach().cpu().clone() for k, m in sparsifier.masks.items()}
        self._ever = {k: m.clone() for k, m in self._last.items()}
        self.records: list[dict[str, Any]] = []
        self._handle = sparsifier.register_update_hook(self._on_update)

    def remove(self) -> None:
        """Stops tracking (the records stay)."""
        self._handle.remove()

    @staticmethod
    def _empty_out(sparsifier) -> dict[str, int]:
        """Output units without an active weight, per parameter: counted on the layers the rules
        see, in (out, in) orientation, so a Conv1D's columns and each block of a fused QKV count."""
        out: dict[str, int] = {}
        for layer in sparsifier.layers():
            m = layer.mask
            name = layer.slot.param_name if layer.slot is not None else layer.name
            out[name] = out.get(name, 0) + (int((~m.reshape(m.shape[0], -1).any(1)).sum()) if m.dim() >= 2 else 0)
        return out

    def _on_update(self, sparsifier, stats: dict) -> None:
        layers: dict[str, dict[str, Any]] = {}
        empty = self._empty_out(sparsifier)
        for name, mask in sparsifier.masks.items():
            now = mask.detach().cpu()
            before = self._last[name]
            pruned = int((before & ~now).sum())
            regrown = int((~before & now).sum())
            self._ever[name] |= now
            active = int(now.sum())
            empty_out = empty[name]
            layers[name] = {"pruned": pruned, "regrown": regrown, "active": active, "total": now.numel(),
                            "turnover": regrown / active if active else 0.0, "empty_out": empty_out,
                            "itop": int(self._ever[name].sum()) / now.numel()}
            self._last[name] = now.clone()
        total_regrown = sum(l["regrown"] for l in layers.values())
        for l in layers.values():
            l["regrow_share"] = l["regrown"] / total_regrown if total_regrown else 0.0
        ever = sum(int(m.sum()) for m in self._ever.values())
        total = sum(l["total"] for l in layers.values())
        self.records.append({
            "step": int(stats.get("step", sparsifier.step_count)),
            "pruned": sum(l["pruned"] for l in layers.values()), "regrown": total_regrown,
            "active": sum(l["active"] for l in layers.values()), "total": total,
            "ever_active": ever, "itop": ever / total, "layers": layers,
        })

    def drain(self) -> list[dict[str, Any]]:
        """The records since the last call, removed from the tracker (the ever-active masks stay):
        a training loop stores them with the epoch's metrics (``row["topology"]``), which
        ``sparselearn report`` plots, and the checkpointed state stays small."""
        out, self.records = self.records, []
        return out

    def series(self, key: str, layer: Optional[str] = None) -> list[float]:
        """One statistic over the updates, for the network or one layer (e.g. ``"itop"``)."""
        if layer is None:
            return [r[key] for r in self.records]
        return [r["layers"][layer][key] for r in self.records]

    def state_dict(self) -> dict[str, Any]:
        return {"last": {k: v.clone() for k, v in self._last.items()},
                "ever": {k: v.clone() for k, v in self._ever.items()},
                "records": [dict(r) for r in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["last"]) != set(self._last):
            raise ValueError(f"tracker state is for layers {sorted(state['last'])}, this sparsifier has {sorted(self._last)}")
        self._last = {k: v.clone().bool() for k, v in state["last"].items()}
        self._ever = {k: v.clone().bool() for k, v in state["ever"].items()}
        self.records = [dict(r) for r in state["records"]]

