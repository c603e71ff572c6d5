"""A trained VIB posterior on disk: the masked model's weights and its masks, so that one training serves several
budgets (METHOD.md: the hard mask is re-thresholded from ``log_alpha``).

```python
vtrans.save_posterior(vib, "posterior/", tokenizer)          # after training, at any budget
vib = vtrans.load_posterior("posterior/")                    # the same model and masks, budget released
vib.apply_budget(vtrans.Budget(params=0.7))                  # re-threshold the same posterior
vtrans.compress(vib).save_pretrained("model-p70/")
```

The folder holds the model as ``save_pretrained`` writes it (with its trained weights: ``vtrans`` and ``fast`` train
them with the masks), the masks' state as ``masks.safetensors`` and ``posterior.json`` (the :class:`VIBConfig`,
task, the budget trained at). It loads with plain transformers plus this module; nothing of the training run is
needed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from vtrans.checkpoint import load_pretrained, write_atomically
from vtrans.config import Budget, VIBConfig
from vtrans.errors import ConfigError, UnknownModelError
from vtrans.vib import VIB, attach

MASKS = "masks.safetensors"
RECORD = "posterior.json"
FORMAT = 1


def save_masks(vib: VIB, path: str | Path) -> Path:
    """The masks' state (every mu and log-variance, and the budget's selection) as safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in vib.state_dict().items()}, str(path))
    return Path(path)


def save_posterior(vib: VIB, directory: str | Path, tokenizer=None, task: str | None = None,
                   overwrite: bool = False) -> Path:
    """Write ``vib``'s model (dense shape, current weights) and masks to ``directory`` (atomically); ``task``
    (``seq-cls``, ``causal-lm``, ``base``) defaults to the model's architecture."""
    from vtrans.checkpoint import infer_task, read_config

    model = vib.model
    record = {
        "format": FORMAT,
        "vib": dataclasses.asdict(vib.config),
        "task": task,
        "num_labels": getattr(model.config, "num_labels", None),
        "trained_budget": dataclasses.asdict(vib.budget) if vib.budget is not None else None,
        "method": vib.method,
    }

    def write(d: Path) -> None:
        model.save_pretrained(d)  # hooks only: the state dict is the model's own
        if record["task"] is None:  # the saved config names the architecture
            record["task"] = infer_task(read_config(d))
        if tokenizer is not None:
            tokenizer.save_pretrained(d)
        save_masks(vib, d / MASKS)
        (d / RECORD).write_text(json.dumps(record, indent=1))

    return write_atomically(directory, write, overwrite=overwrite)


def read_posterior_record(directory: str | Path) -> dict:
    """``posterior.json`` of a saved posterior (checked)."""
    path = Path(directory) / RECORD
    if not path.is_file() or not (Path(directory) / MASKS).is_file():
        raise UnknownModelError(f"{str(directory)!r} is not a saved posterior (no {RECORD} / {MASKS}); "
                                f"write one with vtrans.save_posterior")
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r}: posterior format {record.get('format')!r} is not {FORMAT}")
    return record


def load_posterior(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> VIB:
    """The saved model with its trained masks attached, hard masks back on the threshold rule (no budget applied):
    call :meth:`VIB.apply_budget` with the budget wanted."""
    from safetensors.torch import load_file

    record = read_posterior_record(directory)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = load_pretrained(directory, record["task"], record.get("num_labels"), **kwargs).to(device).eval()
    vib = attach(model, VIBConfig(**record["vib"]))
    state = load_file(str(Path(directory) / MASKS), device=str(device))
    missing, unexpected = vib.load_state_dict(state, strict=False)
    if missing or unexpected:
        vib.remove()
        raise ConfigError(f"{str(directory)!r}: the masks do not fit the model (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]})")
    vib.release_budget()
    vib.method = record.get("method") or "vtrans"
    return vib


def trained_budget(directory: str | Path) -> Budget | None:
    """The budget a saved posterior was trained to (None when it was saved without one)."""
    b = read_posterior_record(directory).get("trained_budget")
    return Budget(**b) if b else None


__all__ = ["load_posterior", "read_posterior_record", "save_masks", "save_posterior", "trained_budget"]
