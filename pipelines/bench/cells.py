"""One cell: (task, method, seed) compressed to every budget, evaluated, fine-tuned and evaluated again; its rows,
its cache key and its cache file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.bench import stats
from pipelines.bench.in_process import _save, load_model, train_in_process
from pipelines.bench.measure import PeakRSS, _log, torch_threads
from pipelines.bench.profiles import (
    DETERMINISTIC,
    PRUNE_SETTINGS,
    TRAINING_FREE,
    VIB_METHODS,
    VIB_SETTINGS,
    TaskProfile,
)
from pipelines.bench.tasks import TaskSetup
from pipelines.config import config_hash, to_dict
from vtrans.metrics import measure
from vtrans.train import final_prune_metrics

CELL_VERSION = 1
OPTIONAL_SETTINGS = ("kl_multipliers", "kl_normalisation", "logvar_init", "keep_sharpness", "threshold", "lr_mu",
                     "lr_lambdas", "mask_lr_decay", "warmup", "selection", "reconstruct", "kwon_tune", "init",
                     "init_keep", "warmup_from", "constraint", "finetune_method", "lora_rank", "lora_alpha",
                     "second_text", "uniform", "lm_eval_tasks", "lm_eval_limit")
"""Task settings added after cells were cached: left at None they are not part of a cell's key."""


@dataclass
class CellSpec:
    """Everything one cell needs; picklable (a Ray task's argument)."""

    setup: TaskSetup
    profile: TaskProfile
    method: str
    seed: int
    finetune: bool
    device: str
    threads: int | None
    models_dir: str
    """Where seed 0 saves its compressed models (what the latency phase times)."""
    cache_file: str

    @property
    def save_models(self) -> bool:
        return self.seed == 0


def cell_key(setup: TaskSetup, t: TaskProfile, method: str, seed: int, finetune: bool, device: str) -> str:
    """What a cell's rows depend on: the task's settings (not the seed counts or how latency is timed), the method
    and seed, the data and teacher, the device and the code version."""
    settings = {k: v for k, v in to_dict(t).items()
                if k not in ("label", "methods", "seeds", "trained_seeds", "finetune_seeds", "latency")}
    settings["flops_seq_len"] = t.latency.seq_len  # the rows' FLOPs are counted at it
    for k in OPTIONAL_SETTINGS:  # a setting added later, left at None, keeps the cells computed before it valid
        if settings.get(k) is None:
            settings.pop(k, None)
    if method in VIB_METHODS:  # a cell trains with its own method's steps: another method's steps leave it valid
        settings["prune_steps"] = t.prune_steps[method]
    else:
        settings = {k: v for k, v in settings.items()
                    if k not in ("prune_steps", "prune_batch", "lr_masks", "lr_weights", "kl_weight", "kl_multipliers",
                                 "kl_normalisation", "logvar_init", "keep_sharpness",
                                 "hidden_weight", "shared_posterior")}
    return config_hash({"settings": settings, "method": method, "seed": seed, "finetune": finetune,
                        "data": setup.keys, "device": device, "version": CELL_VERSION})


def _budget(t: TaskProfile, b: float):
    import vtrans

    return vtrans.Budget(params=b, tolerance=t.tolerance, uniform=bool(t.uniform))


def _kwon_batches(train, t: TaskProfile, seed: int, pad: int) -> list[dict[str, torch.Tensor]]:
    """Kwon's calibration data: ``kwon_samples`` training samples drawn with the seed, in batches."""
    from pipelines.train_jobs import calibration_batches

    return calibration_batches(train, t.kwon_samples, t.kwon_batch, seed, pad)


def _compressions(spec: CellSpec, teacher, train, calibration) -> Iterator[tuple[float, Any, dict]]:
    """``(budget, compressed model, info)`` for every budget of the cell's method, each timed and RSS-sampled."""
    import vtrans
    from vtrans.distill import DistillConfig
    from vtrans.train import PruneConfig, Pruner

    s, t, m = spec.setup, spec.profile, spec.method
    budgets = sorted(t.budgets, reverse=True)

    def fresh():
        return load_model(s.teacher_dir, s.task, s.num_labels, spec.device)

    if m in TRAINING_FREE:
        from vtrans.fisher import kwon_prune

        batches = _kwon_batches(train, t, spec.seed, s.pad_token_id) if m == "kwon" else None
        for b in budgets:
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                model = fresh().eval()
                vib = vtrans.attach(model)
                if m == "kwon":
                    kwon_prune(vib, batches, _budget(t, b), tune=t.kwon_tune is not False)
                else:
                    vib.apply_budget(_budget(t, b), scores=vtrans.score(model, m, seed=spec.seed), method=m)
                small = vtrans.compress(vib).eval()
                dt = time.perf_counter() - t0
            samples = sum(len(x["input_ids"]) for x in batches) if batches else None
            yield b, small, {"compress_s": dt, "prune_samples": samples, "rss": {"compress": rss.as_dict()}}
        return

    steps = t.prune_steps[m]
    data = calibration if m in ("fast", "faster") else train
    recon_batches = _kwon_batches(train, t, spec.seed, s.pad_token_id) if t.reconstruct else None  # as Kwon's tuning
    hidden = t.hidden_weight if m != "faster" else 0.0

    def train_vib(b: float):
        cfg = PruneConfig(method=m, task=s.task, budget=_budget(t, b), steps=steps, rounds=1, finetune_steps=0,
                          batch_size=t.prune_batch, lr_masks=t.lr_masks, lr_weights=t.lr_weights, seed=spec.seed,
                          calibration_samples=t.kwon_samples,
                          **{k: getattr(t, k) for k in PRUNE_SETTINGS if getattr(t, k) is not None},
                          vib=vtrans.VIBConfig(kl_weight=t.kl_weight, kl_multipliers=dict(t.kl_multipliers or {}),
                                               **{k: getattr(t, k) for k in ("kl_normalisation", *VIB_SETTINGS)
                                                  if getattr(t, k) is not None},
                                               seed=spec.seed),
                          distill=DistillConfig(hidden_weight=hidden,
                                                cache_teacher=s.task == "seq-cls" and m != "vtrans"))
        pruner = Pruner(fresh(), cfg, teacher if m != "faster" else None)
        history = train_in_process(pruner, data, s.pad_token_id, spec.device, f"{s.label} {m} s{spec.seed} -> {b:g}")
        return pruner, history

    if t.shared_posterior:
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            pruner, history = train_vib(min(budgets))
            train_s = time.perf_counter() - t0
        posterior = {k: v.clone() for k, v in pruner.vib.state_dict().items()}
        for b in budgets:
            with PeakRSS() as rss_b:
                t0 = time.perf_counter()
                pruner.vib.load_state_dict(posterior)  # a reconstruction rescaled the last budget's means
                pruner.vib.apply_budget(_budget(t, b), method=m)
                if pruner.config.reconstruct:
                    pruner.reconstruct(recon_batches)
                small = vtrans.compress(pruner.vib).eval()
                dt = time.perf_counter() - t0
            yield b, small, {"compress_s": train_s + dt, "train_s": train_s, "threshold_s": dt,
                             "compress_group": f"posterior@{min(budgets):g}", "prune_steps": steps,
                             "prune_samples": len(data), **final_prune_metrics(history),
                             "rss": {"compress": {"peak_rss_mb": max(rss.peak_mb, rss_b.peak_mb),
                                                  "delta_mb": max(rss.delta_mb, rss_b.peak_mb - rss.start_mb)}}}
        return
    for b in budgets:
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            pruner, history = train_vib(b)
            pruner.finish()
            if pruner.config.reconstruct:
                pruner.reconstruct(recon_batches)
            small = vtrans.compress(pruner.vib).eval()
            dt = time.perf_counter() - t0
        yield b, small, {"compress_s": dt, "prune_steps": steps, "prune_samples": len(data),
                         **final_prune_metrics(history), "rss": {"compress": rss.as_dict()}}
        del pruner


def _quality(setup: TaskSetup, model, test, batch: int) -> float:
    return measure(setup.metric, model, test, setup.pad_token_id, batch)


def _second(setup: TaskSetup, model, second, batch: int) -> dict[str, float]:
    """``{"quality_second": ...}`` on the task's second text (none configured: ``{}``)."""
    return {} if second is None else {"quality_second": _quality(setup, model, second, batch)}


def lm_eval_scores(t: TaskProfile, model, tokenizer) -> dict[str, float]:
    """``{"lm_eval_<task>_<metric>": ...}`` of ``model`` on the profile's lm-eval tasks (none configured: ``{}``)."""
    if not t.lm_eval_tasks:
        return {}
    from vtrans.lm_eval import evaluate, flat_metrics

    return flat_metrics(evaluate(model, tokenizer, list(t.lm_eval_tasks), limit=t.lm_eval_limit,
                                 batch_size=t.eval_batch))


def run_cell(spec: CellSpec) -> list[dict]:
    """Compress to every budget, evaluate, fine-tune (when ``spec.finetune``) and evaluate again: the cell's rows.
    Writes them to ``spec.cache_file`` (what a re-run reads instead of computing)."""
    import vtrans
    from vtrans.checkpoint import load_tokenizer
    from vtrans.distill import DistillConfig
    from vtrans.finetune import FinetuneConfig, Finetuner

    s, t = spec.setup, spec.profile
    started = time.perf_counter()
    rows: list[dict] = []
    with torch_threads(spec.threads):
        train, test, calibration = (load_split_ds(s, split) for split in ("train", "test", "calibration"))
        second = load_split_ds(s, "second") if "second" in s.splits else None
        teacher = load_model(s.teacher_dir, s.task, s.num_labels, spec.device).eval()
        tokenizer = load_tokenizer(s.teacher_dir) if t.lm_eval_tasks else None
        for b, small, info in _compressions(spec, teacher, train, calibration):
            rss = dict(info.pop("rss"))
            with PeakRSS() as r_eval:
                q = _quality(s, small, test, t.eval_batch)
                q2 = {**_second(s, small, second, t.eval_batch), **lm_eval_scores(t, small, tokenizer)}
            rss["evaluate"] = r_eval.as_dict()
            counts = vtrans.count(small, seq_len=t.latency.seq_len).as_dict()
            base = {"task": s.label, "method": spec.method, "budget": b, "seed": spec.seed, **info,
                    **{k: v for k, v in counts.items() if k != "seq_len"},
                    "target_params_blocks": b * s.dense["params_blocks"],
                    "budget_met": stats.budget_met(counts["params_blocks"], s.dense["params_blocks"], b,
                                                          t.tolerance)}
            if spec.save_models:
                base["model_dir"] = str(_save(small, Path(spec.models_dir) / spec.method / f"p{b:g}"))
            if spec.method not in DETERMINISTIC or spec.seed == 0:  # the other seeds repeat seed 0's pruning
                rows.append({**base, "finetuned": False, "quality": q, **q2, "rss": rss})
            _log(f"{s.label} {spec.method} p{b:g} s{spec.seed}: {s.metric} {q:.4f} (params blocks "
                 f"{counts['params_blocks']:,}, {info['compress_s']:.1f}s)")
            if not spec.finetune:
                continue
            ft = FinetuneConfig(steps=t.finetune_steps, lr=t.finetune_lr, batch_size=t.finetune_batch, task=s.task,
                                seed=spec.seed, distill=DistillConfig(cache_teacher=s.task == "seq-cls"),
                                method=t.finetune_method or "full", lora=t.lora())
            with PeakRSS() as r_ft:
                t0 = time.perf_counter()
                small.train()
                finetuner = Finetuner(small, ft, teacher)
                train_in_process(finetuner, train, s.pad_token_id, spec.device,
                                 f"{s.label} {spec.method} p{b:g} s{spec.seed} finetune")
                small = finetuner.finish()  # eval mode; lora: the adapters merged into the weights
                del finetuner
                ft_s = time.perf_counter() - t0
            with PeakRSS() as r_eval:
                q_ft = _quality(s, small, test, t.eval_batch)
                q2_ft = {**_second(s, small, second, t.eval_batch), **lm_eval_scores(t, small, tokenizer)}
            rows.append({**base, "finetuned": True, "quality": q_ft, **q2_ft, "finetune_s": ft_s,
                         "finetune_steps": t.finetune_steps, "finetune_method": ft.method,
                         "rss": {**rss, "finetune": r_ft.as_dict(), "evaluate": r_eval.as_dict()}})
            _log(f"{s.label} {spec.method} p{b:g} s{spec.seed} fine-tuned: {s.metric} {q_ft:.4f} ({ft_s:.1f}s)")
            del small
    cache = Path(spec.cache_file)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"rows": rows, "wall_s": time.perf_counter() - started,
                               "teacher_digest": s.teacher_digest}, indent=1))
    os.replace(tmp, cache)
    return rows


def load_split_ds(setup: TaskSetup, split: str):
    from pipelines.stages.products import Data

    return Data(splits=setup.splits, pad_token_id=setup.pad_token_id, num_labels=setup.num_labels).split(split,
                                                                                                         setup.task)


def cached_rows(spec: CellSpec) -> list[dict] | None:
    """The rows of a finished cell with the same key (and its saved models), or None. A cell computed against another
    teacher (its recorded weights digest differs: trained again, or by another executor) is not reused; cells cached
    before the digest was recorded are."""
    f = Path(spec.cache_file)
    if not f.is_file():
        return None
    try:
        cell = json.loads(f.read_text())
        rows = cell["rows"]
    except (OSError, ValueError, KeyError):
        return None
    recorded, now = cell.get("teacher_digest"), spec.setup.teacher_digest
    if recorded and now and recorded != now:
        _log(f"{spec.setup.label} {spec.method} s{spec.seed}: {f} was computed against another teacher "
             f"({recorded[:12]}…, now {now[:12]}…): computed again")
        return None
    if spec.save_models and not all(Path(r.get("model_dir", "")).is_dir() for r in rows if not r["finetuned"]):
        return None
    return rows
