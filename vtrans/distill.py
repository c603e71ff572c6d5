"""What pruning and fine-tuning share: distillation from the dense teacher (its cached outputs and the logit KD
loss), the task kinds, the step limit, and the optimizers' state in a checkpoint.

:class:`Distiller` is the base of :class:`vtrans.train.Pruner` and :class:`vtrans.finetune.Finetuner`: an ``nn.Module``
whose ``forward(batch, step)`` returns ``loss, metrics`` and whose ``optimize(loss, step)`` steps its optimizers, so
:func:`vtrans.train.fit` (in one process or on a Ray Train worker) runs either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from vtrans.checks import check_positive
from vtrans.metrics import TASK_METRICS
from vtrans.sharding import local_like

if TYPE_CHECKING:
    from vtrans.finetune import FinetuneConfig
    from vtrans.train import PruneConfig

#: Most training steps of any phase (``prune.steps``, ``prune.finetune_steps``, ``finetune.steps``, ``teacher.steps``):
#: far beyond a real run (the shipped configs take 250-2000), it stops a typo such as ``1e12`` that would never end.
MAX_STEPS = 1_000_000
#: The training tasks: those of the task -> metric registry (:data:`vtrans.metrics.TASK_METRICS`).
TASKS = tuple(TASK_METRICS)


@dataclass
class DistillConfig:
    """Distillation from the dense teacher (CoFi style: logits plus layer hidden states)."""

    task_weight: float = 1.0
    """Weight of the task loss (cross-entropy / next-token loss)."""
    logit_weight: float = 1.0
    """Weight of the logit KD term ``T^2 * KL(teacher_T || student_T)``."""
    temperature: float = 2.0
    """KD temperature T."""
    hidden_weight: float = 0.0
    """Weight of the layer distillation: MSE between student and teacher hidden states over the kept hidden
    dimensions, relative to the teacher's mean square, averaged over layers."""
    cache_teacher: bool = True
    """Cache the teacher's outputs per sample id (useful for small calibration sets; costs memory for LMs)."""

    def __post_init__(self) -> None:
        for key in ("task_weight", "logit_weight", "hidden_weight"):
            check_positive(f"distill.{key}", getattr(self, key), zero_ok=True)
        check_positive("distill.temperature", self.temperature)


class Distiller(nn.Module):
    """Teacher outputs (cached per sample id when asked), the logit KD loss, and what a sharded data-parallel worker
    (:mod:`vtrans.sharding`) sets: ``grad_hook`` and ``collective_teacher``."""

    config: PruneConfig | FinetuneConfig
    model: PreTrainedModel
    optimizers: dict[str, torch.optim.Optimizer]
    _teacher: list[PreTrainedModel]
    """The dense teacher, or none: then (Faster-VTrans, weights frozen) the student with its masks disabled stands in
    for it, through the pruner's ``vib``."""
    _teacher_cache: dict[int, dict[str, torch.Tensor]]
    grad_hook: Callable[[], None] | None = None
    """Called after every backward, before the optimizers step: a sharded worker averages the gradients of the
    replicated parameters (:meth:`replicated_parameters`) there, as DDP does during the backward."""
    collective_teacher: bool = False
    """Whether the teacher's forward is a collective (a sharded teacher, or the sharded student standing in for it):
    then every worker runs it whenever any worker's batch misses the teacher cache, so all take part."""

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters outside the model (masks, lambdas): what sharding leaves whole on every worker."""
        return []

    def reset_optimizers(self) -> None:
        """Build the optimizers again over the current parameters (after sharding replaced the model's)."""
        raise NotImplementedError

    def rebind(self, model: PreTrainedModel) -> None:
        """Go on with ``model``, an unsharded copy of :attr:`model` holding the same weights (what one process saves
        and compresses after sharded training); masks and their state move over to it."""
        self.model = model

    def merge_adapters(self) -> None:
        """Merge LoRA adapters under way into the weights and remove them (none: nothing to do). After training, every
        worker of a sharded job calls it before the weights are gathered (a collective)."""

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.grad_hook is not None:
            self.grad_hook()

    @torch.no_grad()
    def _teacher_outputs(self, inputs: dict, sample_ids: torch.Tensor | None, hidden: bool) -> dict:
        """Teacher logits (and hidden states) of a batch; per-sample cache entries are stored unpadded and re-padded
        to the batch's length (padded positions are masked out of every distillation loss)."""
        d = self.config.distill
        ids = inputs["input_ids"]
        seq = ids.shape[1]
        mask = inputs.get("attention_mask")
        lengths = (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), seq)).tolist()
        keys = ["logits", "hidden"] if hidden else ["logits"]
        if d.cache_teacher and sample_ids is not None:
            entries = [self._teacher_cache.get(int(i)) for i in sample_ids.tolist()]
            hit = all(e is not None and all(k in e for k in keys) for e in entries)
            if self.collective_teacher:
                hit = _on_every_worker(hit, ids.device)
            if hit:
                return {k: torch.stack([_pad_seq(e[k], seq, k) for e in entries]).to(ids.device) for k in keys}
        if self._teacher:
            out = self._teacher[0](**inputs, output_hidden_states=hidden)
        else:  # Faster-VTrans: frozen weights, so the student without its masks (and dropout) is the dense teacher
            was_training = self.model.training
            self.model.eval()
            with self.vib.disabled():
                out = self.model(**inputs, output_hidden_states=hidden)
            self.model.train(was_training)
        res = {"logits": out.logits.detach()}  # (batch, labels) or (batch, seq, vocab)
        if hidden:
            res["hidden"] = torch.stack(out.hidden_states).transpose(0, 1).detach()  # (batch, layers+1, seq, d)
        if d.cache_teacher and sample_ids is not None:
            for j, i in enumerate(sample_ids.tolist()):
                self._teacher_cache[int(i)] = {k: _trim_seq(v[j], lengths[j], k).cpu() for k, v in res.items()}
        return res

    def _kd(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        t = self.config.distill.temperature
        kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                      reduction="none").sum(-1)  # (batch,) or (batch, seq)
        if mask is not None and kl.dim() == 2:
            return (kl * mask).sum() / mask.sum().clamp_min(1) * t * t
        return kl.mean() * t * t


def save_optimizers(optimizers: dict[str, torch.optim.Optimizer], tensors: dict[str, torch.Tensor]) -> dict:
    """Put every optimizer's tensor state into ``tensors`` (``opt.<name>.<param>.<key>``); return the JSON part."""
    meta = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        scalars: dict = {}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{name}.{idx}.{k}"] = v
                else:
                    scalars[f"{idx}.{k}"] = v
        meta[name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    return meta


def load_optimizers(optimizers: dict[str, torch.optim.Optimizer], tensors: dict[str, torch.Tensor],
                     meta: dict) -> None:
    """The inverse of :func:`save_optimizers`; the state of a sharded parameter is cut to its shard."""
    for name, opt in optimizers.items():
        params = [p for group in opt.param_groups for p in group["params"]]  # the state's indices
        m = meta["optimizers"][name]
        state: dict[int, dict] = {}
        prefix = f"opt.{name}."
        for k, v in tensors.items():
            if k.startswith(prefix):
                idx, key = k[len(prefix):].split(".", 1)
                state.setdefault(int(idx), {})[key] = local_like(params[int(idx)], v) if int(idx) < len(params) else v
        for k, v in m["scalars"].items():
            idx, key = k.split(".", 1)
            state.setdefault(int(idx), {})[key] = v
        opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})


def laid_out_as(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict of ``model`` with each tensor cut to the shard ``model`` holds (unchanged when unsharded)."""
    current = model.state_dict()
    return {k: local_like(current[k], v) if k in current else v for k, v in state.items()}


def _on_every_worker(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every worker of the default process group (itself outside one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _trim_seq(t: torch.Tensor, length: int, key: str) -> torch.Tensor:
    """One sample's teacher output without its padding: sequence axis 0 of LM logits, 1 of hidden states."""
    if key == "hidden":
        return t[:, :length]  # (layers+1, length, d)
    return t[:length] if t.dim() == 2 else t  # LM logits (length, vocab); classifier logits (labels,)


def _pad_seq(t: torch.Tensor, seq: int, key: str) -> torch.Tensor:
    axis = 1 if key == "hidden" else 0
    if key != "hidden" and t.dim() == 1:
        return t
    pad = seq - t.shape[axis]
    if pad <= 0:
        return t
    shape = list(t.shape)
    shape[axis] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=axis)
