"""What each stage hands the next, typed: one class per product, read from a finished stage with ``of(result)``.

A stage's record on disk (``stage.json``) stays plain JSON - ``outputs`` (paths) and ``info`` - so outputs cached by
earlier versions stay readable. These classes name its fields once, for every reader (the stages, both drivers, the
sweep and the benchmark), and write them with ``outputs()`` / ``info()``:

- calibrate -> :class:`Data` (tokenized splits and what reading them needs),
- teacher, finetune -> :class:`Trained` (a model directory),
- prune -> :class:`Pruned` (the compressed model and the posterior it came from),
- evaluate -> :class:`Evaluation` (the report and the model to log).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.stages.base import StageOutput, StageResult
    from pipelines.stages.calibrate import TokenizedDataset


@dataclass(frozen=True)
class Data:
    """The calibrate stage's product: the tokenized splits (parquet files) and what a model needs to read them."""

    splits: dict[str, str]
    """``train`` / ``test`` / ``calibration`` (and any other split) -> its parquet file."""
    pad_token_id: int
    num_labels: int | None = None
    """Classes of a seq-cls task; None for causal-lm."""
    label_names: list[str] | None = None
    """Class names by label id, when the data named its labels."""

    @classmethod
    def of(cls, result: StageResult | StageOutput) -> Data:
        return cls(splits=dict(result.outputs), pad_token_id=result.info["pad_token_id"],
                   num_labels=result.info.get("num_labels"), label_names=result.info.get("label_names"))

    def split(self, name: str, task: str) -> TokenizedDataset:
        """A split as a dataset of token ids and labels."""
        from pipelines.stages.calibrate import TokenizedDataset

        return TokenizedDataset(self.splits[name], task)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pad_token_id": self.pad_token_id}
        if self.num_labels is not None:
            out["num_labels"] = self.num_labels
        if self.label_names is not None:
            out["label_names"] = self.label_names
        return out


@dataclass(frozen=True)
class Trained:
    """The teacher's or the fine-tune's product: a model directory (``from_pretrained`` loads it)."""

    model: str

    @classmethod
    def of(cls, result: StageResult | StageOutput) -> Trained:
        return cls(model=result.outputs["model"])

    def outputs(self) -> dict[str, str]:
        return {"model": self.model}


@dataclass(frozen=True)
class Pruned:
    """The prune stage's product: the compressed model; the trained posterior other budgets can re-threshold (None where
    none was trained); the masks, the layer report and its plot (None from the benchmark's in-process prune)."""

    compressed: str
    """The compressed checkpoint (its ``compression.json`` holds the kept units per layer and the counts)."""
    posterior: str | None = None
    masks: str | None = None
    """The hard masks, ``masks.safetensors``."""
    report: str | None = None
    """The compressed checkpoint's ``compression.json``."""
    plot: str | None = None
    """Kept units per layer, a PNG."""

    @classmethod
    def of(cls, result: StageResult | StageOutput) -> Pruned:
        o = result.outputs
        return cls(compressed=o["compressed"], posterior=o.get("posterior"), masks=o.get("masks"),
                   report=o.get("report"), plot=o.get("plot"))

    def outputs(self) -> dict[str, str]:
        return {k: v for k, v in (("compressed", self.compressed), ("posterior", self.posterior),
                                  ("masks", self.masks), ("report", self.report), ("plot", self.plot)) if v}


@dataclass(frozen=True)
class Evaluation:
    """The evaluate stage's product: the report in markdown (and JSON), and the compressed model to log (None from the
    benchmark's in-process evaluation, which logs none)."""

    report_md: str
    report: str | None = None
    logged_model_dir: str | None = None

    @classmethod
    def of(cls, result: StageResult | StageOutput) -> Evaluation:
        o = result.outputs
        return cls(report_md=o["report_md"], report=o.get("report"), logged_model_dir=o.get("logged_model_dir"))

    def outputs(self) -> dict[str, str]:
        return {k: v for k, v in (("report", self.report), ("report_md", self.report_md),
                                  ("logged_model_dir", self.logged_model_dir)) if v}
