"""Physical compression: fold the evaluation mask values into the adjacent weights, slice every tensor, drop removed
blocks, and load the result into the compressed Hugging Face class of :mod:`vtrans.modeling_vtrans`."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import PreTrainedModel

from vtrans import modeling_vtrans
from vtrans.arch.base import Layout, Slot
from vtrans.budget import Selection, counts
from vtrans.errors import BudgetError
from vtrans.vib import VIB


def _unit_index(slot: Slot, n_units: int, length: int) -> torch.Tensor:
    """Unit id of each element along the slot's axis (-1 outside the slot), shape (length,)."""
    ids = torch.full((length,), -1, dtype=torch.long)
    ids[slot.offset : slot.offset + n_units * slot.width] = torch.arange(n_units).repeat_interleave(slot.width)
    return ids


def _expand(values: torch.Tensor, slot: Slot, length: int, fill: float) -> torch.Tensor:
    """Per-element factor along the slot's axis: the unit's value inside the slot, ``fill`` outside. (length,)"""
    ids = _unit_index(slot, len(values), length)
    out = torch.full((length,), fill, dtype=values.dtype)
    out[ids >= 0] = values[ids[ids >= 0]]
    return out


def _along(vec: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return vec.view(shape)


def axis_masks(shapes: dict[str, tuple[int, ...]], layout: Layout,
               sel: Selection) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Per tensor of ``shapes``, ``(axis, keep)`` for every axis some structure indexes: the elements of that axis a
    selection keeps (all its slots together; elements outside every slot are kept). bool (length,) each."""
    structures = [(layout.hidden, sel.hidden)]
    for i in range(len(layout.groups)):
        structures += [(layout.groups[i], sel.groups[i]), (layout.neurons[i], sel.neurons[i])]
    keep_masks: dict[tuple[str, int], torch.Tensor] = {}
    for slots, keep in structures:
        for slot in slots:
            if slot.key not in shapes:
                continue
            length = shapes[slot.key][slot.axis]
            km = keep_masks.setdefault((slot.key, slot.axis), torch.ones(length, dtype=torch.bool))
            ids = _unit_index(slot, len(keep), length)
            inside = ids >= 0
            km[inside] &= keep[ids[inside]]
    by_key: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for (key, axis), km in keep_masks.items():
        by_key[key].append((axis, km))
    return dict(by_key)


def fold_and_slice(sd: dict[str, torch.Tensor], layout: Layout, sel: Selection,
                   values: dict) -> dict[str, torch.Tensor]:
    """Apply a selection to a dense state dict: mask values multiplied in, pruned units and removed blocks cut out."""
    sd = {k: v for k, v in sd.items() if k not in layout.tied}
    L = len(layout.groups)
    structures: list[tuple[list[Slot], torch.Tensor, torch.Tensor]] = [(layout.hidden, values["hidden"], sel.hidden)]
    for i in range(L):
        structures.append((layout.groups[i], values["groups"][i], sel.groups[i]))
        structures.append((layout.neurons[i], values["neurons"][i], sel.neurons[i]))

    # 1) fold: per-unit values, then whole-tensor block gates
    for slots, vals, _ in structures:
        for slot in slots:
            if slot.fold:
                t = sd[slot.key]
                factor = _expand(vals.to(t.dtype), slot, t.shape[slot.axis], 1.0)
                sd[slot.key] = t * _along(factor, t.dim(), slot.axis)
    for i in range(L):
        for key in layout.mha_fold[i]:
            sd[key] = sd[key] * values["mha"][i].to(sd[key].dtype)
        for key in layout.ffn_fold[i]:
            sd[key] = sd[key] * values["ffn"][i].to(sd[key].dtype)

    # 2) drop removed blocks
    removed: set[str] = set()
    for i in range(L):
        if not sel.mha[i]:
            removed.update(layout.mha_keys[i])
        if not sel.ffn[i]:
            removed.update(layout.ffn_keys[i])
    sd = {k: v for k, v in sd.items() if k not in removed}

    # 3) slice: every (tensor, axis) once, with the pruned elements of all its slots removed together
    for key, cuts in axis_masks({k: tuple(v.shape) for k, v in sd.items()}, layout, sel).items():
        t = sd[key]
        for axis, km in cuts:
            t = t.index_select(axis, torch.nonzero(km).flatten().to(t.device))
        sd[key] = t.contiguous()
    for alias, source in layout.tied.items():
        sd[alias] = sd[source]
    return sd


def layer_specs(vib: VIB, sel: Selection) -> list[dict]:
    """Per-layer widths of the compressed model (0 heads / neurons = the block was removed)."""
    g = vib.geometry
    return [{"heads": int(sel.groups[i].sum()) * g.group_size, "kv_heads": int(sel.groups[i].sum()),
             "intermediate_size": int(sel.neurons[i].sum())} for i in range(g.n_layers)]


def report(vib: VIB, sel: Selection, seq_len: int | None = None) -> dict:
    """The compression record written as compression.json."""
    g = vib.geometry
    seq_len = seq_len or (vib.budget.seq_len if vib.budget else 128)
    budget = None
    if vib.budget is not None:
        b = vib.budget
        target, got = vib.achieved.get("target"), vib.achieved.get("size")
        budget = {"metric": b.metric, "value": b.value, "scope": b.scope, "seq_len": b.seq_len, "uniform": b.uniform,
                  "align": b.alignment if b.aligned else None, "target": target,
                  "achieved_fraction": vib.achieved.get("fraction"),
                  # how close to the target (an aligned budget may land further below it than the tolerance)
                  "achieved_of_target": got / target if target and got is not None else None}
        if b.metric == "latency":
            budget["batch_size"] = b.batch_size
    latency = None
    table = getattr(vib, "latency_table", None)
    if vib.budget is not None and vib.budget.metric == "latency" and table is not None:
        a = vib.achieved
        # predicted from the table; measured_ms is filled by whoever times the compressed model (the CLI, evaluate)
        latency = {"predicted_ms": a.get("predicted_ms"), "target_ms": a.get("target_ms"),
                   "dense_predicted_ms": a.get("dense_predicted_ms"), "dense_measured_ms": table.dense_measured_ms,
                   "outside_ms": table.outside_ms, "measured_ms": None, "table_key": dict(table.key)}
    from vtrans import __version__

    return {
        "vtrans_version": __version__,
        "method": vib.method,
        "source_model": getattr(vib.model.config, "_name_or_path", "") or "",
        "architecture": vib.adapter.name,
        "budget": budget,
        **({"latency": latency} if latency is not None else {}),
        "dense": counts(g, g.dense_keep(), seq_len).as_dict(),
        "compressed": counts(g, sel.keep(), seq_len).as_dict(),
        "hidden_size": {"dense": g.hidden, "kept": int(sel.hidden.sum())},
        "layers": [
            {"heads": int(sel.groups[i].sum()) * g.group_size, "kv_heads": int(sel.groups[i].sum()),
             "ffn_neurons": int(sel.neurons[i].sum()), "attention": bool(sel.mha[i]), "ffn": bool(sel.ffn[i]),
             "kept_kv_groups": torch.nonzero(sel.groups[i]).flatten().tolist()}
            for i in range(g.n_layers)
        ],
    }


@torch.no_grad()
def compress(vib: VIB, tokenizer=None) -> PreTrainedModel:
    """A physically smaller Hugging Face model computing what ``vib.model`` computes in evaluation mode.

    Its config records the per-layer widths; ``save_pretrained`` writes the weights (safetensors), the config, the
    modeling code with ``auto_map`` (with vtrans installed ``from_pretrained(dir)`` uses the installed classes and
    needs no flag; without vtrans, ``trust_remote_code=True`` runs the stored file), compression.json, and the
    tokenizer when one is given here. After a uniform budget (``Budget(uniform=True)``) it is the stock Hugging Face
    class instead (:func:`vtrans.export.to_stock`: no ``auto_map``, no modeling file; compression.json is written).
    """
    model, adapter = vib.model, vib.adapter
    sel = vib.selection()
    if not sel.hidden.any():
        raise BudgetError("the selection keeps no hidden dimension; keep at least one (apply_budget always does)")
    values = vib.hard_values(sel)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd = fold_and_slice(sd, adapter.layout(model), sel, values)

    config = adapter.compressed_config(model, layer_specs(vib, sel), hidden=int(sel.hidden.sum()))
    config.vtrans["report"] = report(vib, sel)
    cls = getattr(modeling_vtrans, adapter.compressed_class_name(model))
    device = next(model.parameters()).device
    with torch.device(device):
        small = cls(config)
    buffers = {k for k, _ in small.named_buffers()}
    missing, unexpected = small.load_state_dict({k: v for k, v in sd.items() if k not in buffers or k in
                                                 small.state_dict()}, strict=False)
    missing = [k for k in missing if k not in buffers]
    unexpected = [k for k in unexpected if k not in buffers]
    if missing or unexpected:
        raise RuntimeError(f"compressed state dict does not match {cls.__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    small.to(dtype=next(model.parameters()).dtype)
    small.train(model.training)
    if tokenizer is not None:
        small.vtrans_tokenizer = tokenizer
    if vib.budget is not None and vib.budget.uniform:
        from vtrans.export import to_stock  # imports this module

        return to_stock(small)
    return small
