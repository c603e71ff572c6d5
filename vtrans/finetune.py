"""Fine-tuning of a compressed model (its structure fixed) with logit distillation from the dense teacher: every
weight (``method: full``) or LoRA adapters merged into the weights at the end (``method: lora``, :mod:`vtrans.lora`).
A step is ``loss, metrics = finetuner(batch, step)`` then ``finetuner.optimize(loss, step)``; :func:`vtrans.train.fit`
runs the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from vtrans.checks import check_choice, check_positive
from vtrans.distill import MAX_STEPS, TASKS, DistillConfig, Distiller, laid_out_as, load_optimizers, save_optimizers
from vtrans.errors import ConfigError, quote
from vtrans.lora import ADAPTER_KEY, LoraAdapters, LoraConfig, add_adapters

#: How a fine-tune trains: every weight, or low-rank adapters merged into the weights at the end (:mod:`vtrans.lora`).
FINETUNE_METHODS = ("full", "lora")


@dataclass
class FinetuneConfig:
    """Fine-tuning of a compressed model (its structure fixed), with logit distillation from the dense teacher."""

    steps: int = 200
    """Fine-tuning steps (0: none; at most :data:`MAX_STEPS` = 1,000,000)."""
    lr: float = 3e-5
    """AdamW learning rate of the weights."""
    batch_size: int = 16
    """Per-step batch size over all workers."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    task: str = "seq-cls"
    """``seq-cls`` or ``causal-lm``."""
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(hidden_weight=0.0))
    """Logit distillation from the teacher (hidden-state distillation is not possible across widths)."""
    seed: int = 0
    """Seed of the data order and of the per-step RNG."""
    eval_every: int = 0
    """Measure the task's quality (accuracy / perplexity) on held-out training samples every this many steps and at
    the end (0: never). What a sweep's ASHA early stopping compares; also logged as the ``val_*`` curve."""
    eval_samples: int = 256
    """Training samples held out of fine-tuning for ``eval_every`` (drawn with ``seed``)."""
    method: str = "full"
    """``full`` (every weight trains) or ``lora`` (the weights stay frozen; low-rank adapters on the blocks' Linear
    layers train, and are merged into the weights before saving: the same kind of checkpoint, a fraction of the
    optimizer state and gradients). A pipeline fine-tunes between pruning rounds the same way
    (:attr:`vtrans.train.PruneConfig.finetune_method`)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapters of ``method: lora`` (rank, alpha, dropout, target_modules); unused by ``full``."""

    def __post_init__(self) -> None:
        check_choice("finetune.method", self.method, FINETUNE_METHODS)
        if not isinstance(self.lora, LoraConfig):
            raise ConfigError(f"finetune.lora must be a vtrans.lora.LoraConfig, got {quote(self.lora)}")
        check_positive("finetune.steps", self.steps, integer=True, zero_ok=True, maximum=MAX_STEPS)
        check_positive("finetune.eval_every", self.eval_every, integer=True, zero_ok=True)
        check_positive("finetune.eval_samples", self.eval_samples, integer=True)
        check_positive("finetune.batch_size", self.batch_size, integer=True)
        check_positive("finetune.lr", self.lr)
        for key in ("weight_decay", "max_grad_norm"):
            check_positive(f"finetune.{key}", getattr(self, key), zero_ok=True)
        if self.task not in TASKS:
            raise ConfigError(f"finetune.task must be one of {list(TASKS)}, got {self.task!r}")
        if self.distill.hidden_weight > 0:
            raise ConfigError("finetune.distill.hidden_weight must be 0: a compressed model's hidden size differs "
                              f"from the teacher's, got {self.distill.hidden_weight!r}")

    @property
    def total_steps(self) -> int:
        return self.steps


class Finetuner(Distiller):
    """A compressed model trained on the task with logit distillation from the dense teacher.

    With ``config.method == "lora"`` the model gets LoRA adapters in place (:func:`vtrans.lora.add_adapters`, seeded
    by ``config.seed``): its weights freeze and the optimizer holds the adapters only. :meth:`finish` merges them
    into the weights and returns the model to save (the same class and state-dict keys as the input model)."""

    def __init__(self, model: PreTrainedModel, config: FinetuneConfig, teacher: PreTrainedModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.adapters: LoraAdapters | None = add_adapters(model, config.lora, seed=config.seed) \
            if config.method == "lora" else None
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []
        self._teacher_cache: dict[int, dict[str, torch.Tensor]] = {}
        self.reset_optimizers()

    def reset_optimizers(self) -> None:
        params = self.adapters.parameters() if self.adapters is not None else \
            [p for p in self.model.parameters() if p.requires_grad]
        self.optimizers = {"finetune": torch.optim.AdamW(params, lr=self.config.lr,
                                                         weight_decay=self.config.weight_decay)}

    def rebind(self, model: PreTrainedModel) -> None:
        if self.adapters is not None and not self.adapters.merged:
            raise RuntimeError("merge the LoRA adapters (merge_adapters) before moving to another copy of the model")
        self.model = model

    def merge_adapters(self) -> None:
        if self.adapters is not None:
            self.adapters.merge()

    def finish(self) -> PreTrainedModel:
        """The fine-tuned model to save, in eval mode: with ``lora`` the adapters merged into the weights and removed
        (in place: training is over; calling it again returns the same model)."""
        self.merge_adapters()
        return self.model.eval()

    def begin_step(self, step: int) -> tuple[int, str, int]:
        self.model.train()
        return 0, "finetune", step

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        c, d = self.config, self.config.distill
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = self.model(**inputs, labels=batch["labels"])
        loss = d.task_weight * out.loss
        metrics = {"task_loss": float(out.loss.detach())}
        if self._teacher and d.logit_weight > 0:
            teacher = self._teacher_outputs(inputs, batch.get("sample_id"), hidden=False)
            lm_mask = inputs.get("attention_mask") if c.task == "causal-lm" else None
            kd = self._kd(out.logits, teacher["logits"], lm_mask)
            loss = loss + d.logit_weight * kd
            metrics["kd_loss"] = float(kd.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def optimize(self, loss: torch.Tensor, step: int) -> None:
        opt = self.optimizers["finetune"]
        opt.zero_grad(set_to_none=True)
        self._backward(loss)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                           self.config.max_grad_norm)
        opt.step()

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The training state; with ``lora`` the adapters only (the frozen weights are the input model's)."""
        if self.adapters is not None and self.adapters.merged:
            raise RuntimeError("the LoRA adapters were merged (Finetuner.finish): there is no training state left")
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()
                   if self.adapters is None or ADAPTER_KEY in k}
        meta = {"optimizers": save_optimizers(self.optimizers, tensors), "method": self.config.method}
        tensors["rng.torch"] = torch.get_rng_state()
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        saved = meta.get("method", "full")
        if saved != self.config.method:
            raise ConfigError(f"finetune.method={self.config.method!r} cannot resume a checkpoint of "
                              f"finetune.method={saved!r}; start the fine-tune over (a new run name or storage path)")
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        if self.adapters is not None:
            missing = {k for k in self.model.state_dict() if ADAPTER_KEY in k} - set(model_sd)
            if missing:
                raise ConfigError(f"the checkpoint lacks {len(missing)} LoRA adapter tensor(s) of this "
                                  f"finetune.lora (e.g. {sorted(missing)[0]!r}): was it saved with other "
                                  f"rank / target_modules?")
        self.model.load_state_dict(laid_out_as(self.model, model_sd), strict=False)
        load_optimizers(self.optimizers, tensors, meta)
        torch.set_rng_state(tensors["rng.torch"])
