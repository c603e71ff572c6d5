"""VIB pruning and fine-tuning as data-parallel Ray Train jobs (Train V2).

Each job is a ``TorchTrainer`` with N workers, each taking its contiguous share of every global batch. How a worker
holds the model is ``ray.strategy`` (:class:`_Placement`): ``ddp`` - the whole model, its masks and the lambdas (one
:class:`vtrans.train.Pruner` / :class:`~vtrans.finetune.Finetuner` wrapped by ``prepare_model``, so DDP all-reduces the
gradients of weights and mask parameters alike); ``fsdp`` - 1/N of every transformer block (and of the teacher) with
the masks and lambdas whole, their gradients averaged after each backward (:mod:`vtrans.sharding`); checkpoints then
gather the full state on rank 0, in the same format. Rank 0 writes
checkpoints (weights, masks, lambdas, optimizer states, step, metric history) as safetensors + JSON every
``checkpoint_every`` steps; a run started again with the same ``name`` and ``storage_path`` resumes from its last
checkpoint, and ``FailureConfig(max_failures)`` restarts failed workers from it. Training noise is keyed by (seed,
step, sample id) and every step re-seeds the RNG, so N workers compute what one worker computes on the whole batch
and a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.config import RayConfig
from pipelines.ray_runtime import init_ray
from vtrans.checkpoint import check_reachable_at
from vtrans.data import collate, global_order
from vtrans.errors import ConfigError
from vtrans.metrics import measure, task_metric
from vtrans.progress import Progress

OUTPUT = "output"


@dataclass
class JobSpec:
    """What the workers train on: a local model directory, its task and the (tokenized) training dataset."""

    model_dir: str
    task: str
    dataset: Any
    """A map-style dataset of dicts with ``input_ids``, ``labels`` and ``sample_id`` (see :mod:`vtrans.data`)."""
    pad_token_id: int
    num_labels: int | None = None
    teacher_dir: str | None = None
    """Dense teacher for distillation (default: ``model_dir`` for pruning; none for fine-tuning)."""
    tokenizer_dir: str | None = None
    eval_dataset: Any = None
    """Held-out samples a fine-tune measures its quality on every ``finetune.eval_every`` steps (rank 0)."""


@dataclass
class JobResult:
    """Where a finished job left its outputs."""

    name: str
    path: str
    """The run's folder under the storage path."""
    output: str
    """``output/`` with the job's products (``compressed/``, ``masks.safetensors`` and ``posterior/`` of a prune job,
    ``model/`` of a fine-tune; ``history.json``)."""
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    node_ids: list[str] = field(default_factory=list)
    """The Ray node of each worker, by rank."""


def check_resources(ray_cfg: RayConfig) -> None:
    """Fail before any worker starts when the cluster cannot host the job."""
    import ray

    res = ray.cluster_resources()
    need_cpu = ray_cfg.num_workers * ray_cfg.cpus_per_worker
    if ray_cfg.use_gpu:
        gpus = res.get("GPU", 0)
        if gpus < ray_cfg.num_workers:
            raise ConfigError(f"ray.use_gpu=true needs {ray_cfg.num_workers} GPU(s) for ray.num_workers="
                              f"{ray_cfg.num_workers}, the cluster has {gpus:g}")
    elif res.get("CPU", 0) < need_cpu:
        raise ConfigError(f"ray.num_workers={ray_cfg.num_workers} x {ray_cfg.cpus_per_worker:g} CPU needs "
                          f"{need_cpu:g} CPUs, the cluster has {res.get('CPU', 0):g}")


def _check_batch(batch_size: int, ray_cfg: RayConfig, key: str) -> None:
    if batch_size % ray_cfg.num_workers:
        raise ConfigError(f"{key}={batch_size} must be divisible by ray.num_workers={ray_cfg.num_workers}")


# ---------------------------------------------------------------------------------------------------------------------
# the worker loop (runs inside Ray Train workers)
# ---------------------------------------------------------------------------------------------------------------------


def _global_batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Sample indices of global batch ``step``: the epoch's shared order (``vtrans.data.global_order``) cut into full
    batches (the incomplete last batch of an epoch is dropped)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ConfigError(f"batch_size={batch_size} is larger than the dataset ({n} samples)")
    epoch, k = divmod(step, per_epoch)
    return global_order(n, shuffle=True, seed=seed, epoch=epoch)[k * batch_size : (k + 1) * batch_size]


def worker_batch(dataset, batch_size: int, seed: int, step: int, rank: int, world: int,
                 pad_token_id: int) -> dict[str, torch.Tensor]:
    """This worker's contiguous share of global batch ``step`` (so N workers x B/N = 1 worker x B)."""
    idx = _global_batch_indices(len(dataset), batch_size, seed, step)
    share = batch_size // world
    return collate([dataset[i] for i in idx[rank * share : (rank + 1) * share]], pad_token_id)


def calibration_batches(dataset, count: int, batch_size: int, seed: int, pad_token_id: int) -> list[dict]:
    """``count`` samples of ``dataset`` drawn with ``seed`` (all of it when smaller), collated in batches: a Fisher
    estimate's data (Kwon's baseline)."""
    from pipelines.sources import random_rows

    rows = random_rows(len(dataset), count=min(count, len(dataset)), seed=seed)
    return [collate([dataset[i] for i in rows[s : s + batch_size]], pad_token_id)
            for s in range(0, len(rows), batch_size)]


def prune_calibration(dataset, cfg, pad_token_id: int, device="cpu") -> list[dict]:
    """The calibration batches of a pruning run (``PruneConfig.calibration_steps``: its first global batches), as
    :func:`vtrans.train.fit` draws them in one process, so every worker and the in-process loop use the same."""
    return [{k: v.to(device) for k, v in worker_batch(dataset, cfg.batch_size, cfg.seed, s, 0, 1,
                                                      pad_token_id).items()} for s in cfg.calibration_steps()]


def _load_model(model_dir: str, task: str, num_labels: int | None):
    from vtrans.checkpoint import load_pretrained

    kwargs = {"num_labels": num_labels} if num_labels is not None and task == "seq-cls" else {}
    return load_pretrained(model_dir, task=task, dtype=torch.float32, **kwargs)


class _LiveCurves:
    """Rank 0's training curves streamed to an MLflow run while the job runs (``{"uri", "run_id"}``); a tracking
    failure is reported once and never stops training (the curves are also in ``history.json``)."""

    def __init__(self, tracking: dict | None, resumed: bool = False) -> None:
        self.tracking, self.pending, self.failed = tracking, [], False
        self.logged_through = self._last_logged_step() if resumed else -1
        """A job restarted from a checkpoint re-runs the steps after it; those already in the run are not logged
        again (the same seeds give the same values), so its curves continue rather than restart."""

    def _last_logged_step(self) -> int:
        if self.tracking is None:
            return -1
        try:
            from mlflow import MlflowClient

            key = self.tracking.get("prefix", "") + "loss"
            return max((m.step for m in MlflowClient(self.tracking["uri"]).get_metric_history(
                self.tracking["run_id"], key)), default=-1)
        except Exception:  # noqa: BLE001 - the store is down: flush will find out and say so
            return -1

    def add(self, metrics: dict) -> None:
        if self.tracking is not None and not self.failed and metrics.get("step", 0) > self.logged_through:
            self.pending.append(dict(metrics))

    def flush(self) -> None:
        if not self.pending:
            return
        try:
            from pipelines.tracking import Tracker

            tracker = Tracker(self.tracking["uri"], "", "")
            tracker.log_history(self.tracking["run_id"], self.pending, prefix=self.tracking.get("prefix", ""))
            self.failed = tracker.offline  # it said so once; the curves stay in history.json for `vtrans relog`
        except Exception as e:  # noqa: BLE001
            self.failed = True
            print(f"warning: streaming curves to MLflow failed ({type(e).__name__}: {e}); they stay in history.json",
                  flush=True)
        self.pending = []


#: The report key of a held-out evaluation's fine-tune step (steps done): the time axis of ASHA's rungs.
FINETUNE_STEP = "finetune_step"


def _held_out_quality(model, spec: JobSpec, batch_size: int) -> dict[str, float]:
    """The task's quality metric (:func:`vtrans.metrics.task_metric`) on the held-out samples, as ``val_<metric>``."""
    metric = task_metric(spec.task)
    return {f"val_{metric}": measure(metric, model, spec.eval_dataset, spec.pad_token_id, batch_size)}


class _RayWorker:
    """A Ray Train worker's side of a job: its rank, the world size and device, the checkpoint to resume from, the
    reports (with checkpoints) to the controller, DDP wrapping and its node."""

    keeps_checkpoints = True

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        _quiet_ray_train_logs()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def resume_from(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    def prepare(self, module, find_unused: bool):
        import ray.train.torch

        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": find_unused})

    def node_ids(self) -> list[str]:
        """Every worker's Ray node id, by rank (a collective: all ranks call it)."""
        import ray

        return _gathered(ray.get_runtime_context().get_node_id(), self.world)


class _InProcess:
    """The job's one worker in the calling process, without Ray (a pipeline run by
    :func:`pipelines.dag.run_in_process` with ``StageContext.in_process``: the benchmark's local executor). Nothing to
    resume from and no checkpoints (nothing can fail over); the curve is in ``history.json`` as for a Ray job."""

    keeps_checkpoints = False
    rank, world = 0, 1

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    @contextlib.contextmanager
    def resume_from(self) -> Iterator[str | None]:
        yield None

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        pass

    def prepare(self, module, find_unused: bool):
        return module

    def node_ids(self) -> list[str]:
        return []


def load_latest_state(latest: str | os.PathLike, run_dir: str | os.PathLike) -> tuple[dict, dict]:
    """The training state of checkpoint ``latest``; when its checksum fails, the newest other checkpoint of the run
    (``run_dir/checkpoint_*``, Ray keeps two) that loads, with a warning: a corrupted checkpoint costs the steps since
    the previous one, never a silently wrong model. :class:`~vtrans.errors.CheckpointError` when none loads."""
    from vtrans.checkpoint import STATE_META, CheckpointError, load_state

    try:
        return load_state(latest)
    except CheckpointError as e:
        failure = str(e)
    others = []
    for d in Path(run_dir).glob("checkpoint_*"):
        if d.resolve() == Path(latest).resolve() or not (d / STATE_META).is_file():
            continue
        try:
            others.append((json.loads((d / STATE_META).read_text())["step"], d))
        except (OSError, ValueError, KeyError):
            continue
    for step, d in sorted(others, key=lambda x: x[0], reverse=True):
        try:
            state = load_state(d)
        except CheckpointError:
            continue
        print(f"warning: {failure}; resuming from the previous checkpoint {d} (step {step}) instead", flush=True)
        return state
    raise CheckpointError(f"{failure}, and no other checkpoint of {str(run_dir)!r} loads; remove that folder to "
                          f"start the job over")


class _Placement:
    """How a worker holds the module (``ray.strategy``), the one place the training loop differs between them.

    ``ddp``: Ray Train's ``prepare_model`` - a whole copy per worker, DDP all-reduces every gradient. ``fsdp``: the
    model (and the teacher) sharded by :func:`vtrans.sharding.shard`; masks and lambdas replicated, their gradients
    averaged by the module's ``grad_hook``; checkpoints and the final model gathered to rank 0 (collectives: every
    rank calls :meth:`state` and :meth:`unshard`)."""

    def __init__(self, strategy: str, worker: _RayWorker | _InProcess) -> None:
        self.sharded, self.worker, self.rank, self.device = strategy == "fsdp", worker, worker.rank, worker.device

    def wrap(self, module, teacher, find_unused: bool):
        """Place ``module`` on this worker; returns what computes ``loss, metrics`` (:func:`vtrans.train.fit`'s
        ``forward``)."""
        if not self.sharded:
            if teacher is not None:  # held outside the module's parameters (not trained): prepare_model leaves it
                teacher.to(self.device)
            return self.worker.prepare(module, find_unused)
        from vtrans.sharding import average_grads, shard

        for model in (module.model, teacher):
            if model is not None:
                shard(model, self.device)
        for child in module.children():  # the masks and lambdas: whole on every worker
            if child is not module.model:
                child.to(self.device)
        module.reset_optimizers()  # sharding replaced the model's parameters
        replicated = module.replicated_parameters()
        module.grad_hook = lambda: average_grads(replicated)
        module.collective_teacher = True
        return module

    def state(self, module) -> tuple[dict, dict] | None:
        """The training state to checkpoint, on rank 0 (None elsewhere); unsharded, whatever the strategy."""
        if not self.sharded:
            return module.state_tensors() if self.rank == 0 else None
        from vtrans.sharding import gather

        tensors, meta = module.state_tensors()
        tensors = gather(tensors, keep=self.rank == 0)
        return (tensors, meta) if self.rank == 0 else None

    def unshard(self, module, spec: JobSpec, weights_trained: bool) -> None:
        """After training: rank 0 goes on with a whole model holding the trained weights (compression and saving are
        one process's work); the other ranks only help gather them."""
        if not self.sharded:
            return
        from vtrans.sharding import gather

        full = gather(module.model.state_dict(), keep=self.rank == 0) if weights_trained else {}
        if self.rank == 0:
            model = _load_model(spec.model_dir, spec.task, spec.num_labels)
            if full:
                model.load_state_dict(full)
            module.rebind(model.to(self.device))


def _memory_mb(module) -> dict[str, float]:
    """This process's memory: peak and current resident set, and what its training state occupies (parameters,
    gradients and optimizer state held here: a shard of them under ``fsdp``)."""
    from vtrans.sharding import is_sharded

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if is_sharded(t) else t
        return t.numel() * t.element_size()

    params = {id(p): p for p in module.parameters()}
    params.update({id(p): p for o in module.optimizers.values() for g in o.param_groups for p in g["params"]})
    state = sum(nbytes(p) + (nbytes(p.grad) if p.grad is not None else 0) for p in params.values())
    state += sum(nbytes(v) for o in module.optimizers.values() for st in o.state.values() for v in st.values()
                 if torch.is_tensor(v))
    current = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) / 1024
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "rss_mb": current, "train_state_mb": state / 2**20}


def _gathered(value, world: int) -> list:
    """``value`` of every rank, by rank (a collective: all ranks call it)."""
    if world == 1 or not torch.distributed.is_initialized():
        return [value]
    values: list = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint of every worker at INFO; keep the job's log about the job
    (``VTRANS_VERBOSE=1`` keeps them)."""
    import logging

    if os.environ.get("VTRANS_VERBOSE") == "1":
        return
    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):  # Ray names the context module's logger by its file path
        logging.getLogger(name).setLevel(logging.WARNING)


def _train_loop(loop_config: dict, worker: _RayWorker | _InProcess | None = None) -> None:
    """A job's training on one worker: a Ray Train worker (``worker`` None: what ``TorchTrainer`` runs), or the
    calling process (:class:`_InProcess`)."""
    from vtrans import compress
    from vtrans.checkpoint import load_tokenizer, save_state, write_atomically
    from vtrans.finetune import Finetuner
    from vtrans.posterior import save_masks, save_posterior
    from vtrans.train import Pruner, fit

    kind, spec, cfg = loop_config["kind"], loop_config["spec"], loop_config["config"]
    worker = worker or _RayWorker()
    rank, world, device = worker.rank, worker.world, worker.device
    torch.manual_seed(cfg.seed)
    if loop_config.get("threads"):  # in process: the caller's threads
        torch.set_num_threads(max(1, int(loop_config["threads"])))
    model = _load_model(spec.model_dir, spec.task, spec.num_labels)
    teacher_dir = spec.teacher_dir or (spec.model_dir if kind == "prune" else None)
    teacher = None
    if teacher_dir is not None and (kind == "finetune" or cfg.method != "faster"):
        teacher = _load_model(teacher_dir, spec.task, spec.num_labels)
    module = Pruner(model, cfg, teacher) if kind == "prune" else Finetuner(model, cfg, teacher)

    start, history, state = 0, [], None
    with worker.resume_from() as d:
        if d is not None:
            state = load_latest_state(d, Path(loop_config["output_dir"]).parent)
            start, history = state[1]["step"] + 1, state[1].get("history", [])
    placement = _Placement(loop_config.get("strategy", "ddp"), worker)
    if kind == "prune" and start == 0 and cfg.init == "fisher":  # every rank alike (same batches, deterministic)
        # before placing, on the whole model: on the worker's device under ddp, on the host under fsdp (the model
        # does not fit the device whole; the Fisher pass then runs on the host's CPUs)
        where = device if not placement.sharded else torch.device("cpu")
        module.to(where)
        module.warm_start(prune_calibration(spec.dataset, cfg, spec.pad_token_id, where))
    # masks and lambdas sit idle during the fine-tunes between rounds (and, with LoRA there, the frozen weights)
    unused = kind == "prune" and cfg.finetunes_between_rounds
    forward = placement.wrap(module, teacher, unused)
    if state is not None:  # after placing: a sharded worker cuts its shard of the saved (whole) state
        module.load_state_tensors(*state)
    total = cfg.total_steps
    every, report_every = loop_config["checkpoint_every"], loop_config["report_every"]
    curves = _LiveCurves(loop_config.get("tracking"), resumed=start > 0) if rank == 0 else None
    label = loop_config.get("label") or kind
    eval_every = getattr(cfg, "eval_every", 0) if kind == "finetune" and spec.eval_dataset is not None else 0
    bar = Progress(total=total - start, desc=label + (f" (resumed at step {start})" if start else ""),
                   unit="step") if rank == 0 else None

    def batches(step: int) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in worker_batch(spec.dataset, cfg.batch_size, cfg.seed, step, rank, world,
                                                         spec.pad_token_id).items()}

    def on_step(step: int, metrics: dict) -> None:
        last = step == total - 1
        evaluate = eval_every > 0 and ((step + 1) % eval_every == 0 or last)
        if evaluate:
            # what a sweep's ASHA compares, at fine-tune step `finetune_step` (rank 0's report reaches Tune)
            metrics[FINETUNE_STEP] = step + 1
            if rank == 0 or placement.sharded:  # a sharded model's forward takes every rank
                metrics.update(_held_out_quality(module.model, spec, cfg.batch_size))
        history.append(metrics)
        if rank == 0:
            curves.add(metrics)
            bar.update(1, loss=metrics["loss"])
            if (step + 1) % report_every == 0 or last or evaluate:
                curves.flush()
        if worker.keeps_checkpoints and ((step + 1) % every == 0 or last):
            with tempfile.TemporaryDirectory() as tmp:
                saved = placement.state(module)
                if saved is not None:
                    tensors, meta = saved
                    save_state(tmp, tensors, dict(meta, step=step, history=history, kind=kind))
                worker.report(dict(metrics), tmp if saved is not None else None)
        elif (step + 1) % report_every == 0 or evaluate:
            worker.report(dict(metrics))

    before = loop_config.get("before_step")
    fit(module, batches, start, total, on_step, forward=forward, rank=rank, warm_start=False,
        before_step=None if before is None else lambda step: before(step, rank))

    nodes = worker.node_ids()
    memory = _gathered(_memory_mb(module), world)  # at the end of training, before rank 0 builds the outputs
    module.merge_adapters()  # LoRA adapters into the weights on every rank (sharded: before the weights are gathered)
    placement.unshard(module, spec, weights_trained=kind == "finetune" or cfg.method != "faster")
    if rank == 0:
        bar.close()
        out = Path(loop_config["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        tokenizer = load_tokenizer(spec.tokenizer_dir or spec.model_dir)

        def save_with_tokenizer(product):
            def write(directory: Path) -> None:
                product.save_pretrained(directory)
                if tokenizer is not None:
                    tokenizer.save_pretrained(directory)
            return write

        if kind == "prune":
            module.finish()
            # the trained weights and masks, before compression: other budgets re-threshold them (vtrans.posterior)
            save_posterior(module.vib, out / "posterior", tokenizer, task=spec.task, overwrite=True)
            if cfg.reconstruct:  # after the posterior: it rescales the kept units' means
                module.reconstruct(prune_calibration(spec.dataset, cfg, spec.pad_token_id, device))
            save_masks(module.vib, out / "masks.safetensors")
            write_atomically(out / "compressed", save_with_tokenizer(compress(module.vib)), overwrite=True)
        else:  # with finetune.method=lora: the adapters merged into the weights (the input checkpoint's class)
            write_atomically(out / "model", save_with_tokenizer(module.finish()), overwrite=True)
        (out / "history.json").write_text(json.dumps(history))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        (out / "resources.json").write_text(json.dumps({"peak_rss_mb": peak, "rank": rank, "world_size": world,
                                                        "node_ids": nodes, "strategy": loop_config.get("strategy"),
                                                        "training_memory_by_rank": memory}))


# ---------------------------------------------------------------------------------------------------------------------
# the driver side
# ---------------------------------------------------------------------------------------------------------------------


def _run_in_process(kind: str, spec: JobSpec, config, ray_cfg: RayConfig, out: Path, report_every: int,
                    tracking: dict | None, label: str | None) -> JobResult:
    """The job's loop (:func:`_train_loop`) as one worker in this process, on ``ray_cfg.use_gpu``'s device, with the
    caller's torch threads: the same steps, batches and outputs as a 1-worker Ray job."""
    loop_config = {"kind": kind, "spec": spec, "config": config, "output_dir": str(out), "checkpoint_every": 1,
                   "report_every": report_every, "tracking": tracking, "label": label, "strategy": "ddp"}
    t0 = time.perf_counter()
    _train_loop(loop_config, _InProcess("cuda" if ray_cfg.use_gpu else "cpu"))
    history = json.loads((out / "history.json").read_text())
    return JobResult(name=out.parent.name, path=str(out.parent), output=str(out), history=history,
                     wall_time_s=time.perf_counter() - t0)


def _run(kind: str, spec: JobSpec, config, ray_cfg: RayConfig, name: str, storage_path: str | os.PathLike,
         checkpoint_every: int, report_every: int, threads_per_worker: int | None, before_step,
         tracking: dict | None = None, label: str | None = None, report_to_tune: bool = False,
         in_process: bool = False) -> JobResult:
    storage = Path(storage_path).expanduser().absolute()
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ConfigError(f"{kind}.checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    out = storage / name / OUTPUT
    if in_process:
        if report_to_tune or before_step is not None:
            raise ConfigError(f"a {kind} job in process takes no report_to_tune / before_step (Ray jobs only)")
        return _run_in_process(kind, spec, config, ray_cfg, out, report_every, tracking, label)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _check_batch(config.batch_size, ray_cfg, f"{kind}.batch_size")
    init_ray(ray_cfg.address)
    check_resources(ray_cfg)
    callbacks = []
    if report_to_tune:  # the job's reports reach the Tune trial that runs it (what a sweep's ASHA scheduler reads)
        from ray.tune.integration.ray_train import TuneReportCallback
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session  # Ray 2.60 (pinned): no public equivalent

        if not _in_tune_session():
            raise ConfigError("report_to_tune=True needs a Ray Tune trial to report to (the job runs outside Tune)")
        callbacks.append(TuneReportCallback())
    threads = threads_per_worker or max(1, int(ray_cfg.cpus_per_worker))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"kind": kind, "spec": spec, "config": config, "output_dir": str(out),
                           "checkpoint_every": checkpoint_every, "report_every": report_every, "threads": threads,
                           "before_step": before_step, "tracking": tracking, "label": label,
                           "strategy": ray_cfg.strategy},
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                                     resources_per_worker={"CPU": ray_cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures), callbacks=callbacks),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:
        own = _vtrans_error(e)
        if own is not None:  # a worker found bad input (e.g. an unreachable budget): that is the error to show
            raise own from None
        raise
    wall = time.perf_counter() - t0
    history = json.loads((out / "history.json").read_text()) if (out / "history.json").is_file() else []
    used = json.loads((out / "resources.json").read_text()) if (out / "resources.json").is_file() else {}
    return JobResult(name=name, path=str(result.path), output=str(out), history=history, wall_time_s=wall,
                     node_ids=used.get("node_ids", []))


def _vtrans_error(e: BaseException, depth: int = 0) -> BaseException | None:
    """The :class:`vtrans.errors.VtransError` behind a Ray Train failure, if a worker raised one."""
    from vtrans.errors import VtransError

    if isinstance(e, VtransError) or depth > 4:
        return e if isinstance(e, VtransError) else None
    inner = [getattr(e, "cause", None), *getattr(e, "worker_failures", {}).values()]
    for x in inner:
        if isinstance(x, BaseException) and (found := _vtrans_error(x, depth + 1)) is not None:
            return found
    return None


def run_prune_job(spec: JobSpec, config, ray_cfg: RayConfig, name: str, storage_path: str | os.PathLike,
                  checkpoint_every: int = 50, report_every: int = 10, threads_per_worker: int | None = None,
                  before_step=None, tracking: dict | None = None, label: str | None = None,
                  in_process: bool = False) -> JobResult:
    """Train VIB masks (and, except for ``faster``, the weights) to ``config.budget``; output the exact-budget masks
    and the compressed model. Validates everything, then starts the workers (``in_process``: runs the one worker's
    loop in this process instead, without Ray).

    ``before_step(step, rank)`` is called on every worker before every step (picklable: it travels to the workers;
    the fault-tolerance tests inject their failures with it). ``tracking`` (``{"uri": ..., "run_id": ...}``)
    streams rank 0's training curves to that MLflow run as the job runs; ``label`` names the job in progress lines."""
    from vtrans.train import PruneConfig

    if not isinstance(config, PruneConfig):
        raise ConfigError(f"prune config must be a vtrans.train.PruneConfig, got {type(config).__name__}")
    check_reachable_at(spec.model_dir, spec.task, config.budget, spec.num_labels)
    if config.lora_between_rounds:  # LoRA between rounds: its targets checked before any worker starts
        from vtrans.lora import check_targets_at

        check_targets_at(spec.model_dir, spec.task, config.lora, spec.num_labels)
    return _run("prune", spec, config, ray_cfg, name, storage_path, checkpoint_every, report_every,
                threads_per_worker, before_step, tracking, label, in_process=in_process)


def run_finetune_job(spec: JobSpec, config, ray_cfg: RayConfig, name: str, storage_path: str | os.PathLike,
                     checkpoint_every: int = 50, report_every: int = 10, threads_per_worker: int | None = None,
                     before_step=None, tracking: dict | None = None, label: str | None = None,
                     report_to_tune: bool = False, in_process: bool = False) -> JobResult:
    """Fine-tune a compressed model (``spec.model_dir``) with distillation from ``spec.teacher_dir``;
    ``report_to_tune`` hands its reports to the Tune trial that runs it (ASHA). With ``config.method == "lora"``
    the workers train LoRA adapters and rank 0 saves the model with them merged (``output/model/``: the input
    checkpoint's class and keys); its checkpoints hold the adapters and their optimizer state only. ``in_process``:
    the one worker's loop in this process, without Ray."""
    from vtrans.finetune import FinetuneConfig

    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"finetune config must be a vtrans.finetune.FinetuneConfig, got {type(config).__name__}")
    if config.steps == 0:
        raise ConfigError("finetune.steps is 0: nothing to run")
    if config.method == "lora":  # a target_modules name that matches nothing fails here, before any worker starts
        from vtrans.lora import check_targets_at

        check_targets_at(spec.model_dir, spec.task, config.lora, spec.num_labels)
    return _run("finetune", spec, config, ray_cfg, name, storage_path, checkpoint_every, report_every,
                threads_per_worker, before_step, tracking, label, report_to_tune, in_process)


__all__ = ["JobResult", "JobSpec", "check_resources", "run_finetune_job", "run_prune_job", "worker_batch"]
