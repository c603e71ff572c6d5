"""Ray Train jobs on a real local Ray: data-parallel correctness, resume and recovery, bad input before any worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

import vtrans
from pipelines.config import RayConfig
from pipelines.train_jobs import JobSpec, run_finetune_job, run_prune_job, worker_batch
from tests.pipelines.faults import FailOnce
from tests.tiny import tiny
from vtrans.finetune import FinetuneConfig
from vtrans.train import PruneConfig

N = 64


def _dataset() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 60, (N, 10), generator=g)
    return [{"input_ids": x[i], "labels": (x[i, 0] > 31).long(), "sample_id": torch.tensor(i)} for i in range(N)]


def test_worker_shares_partition_the_global_batch() -> None:
    ds = _dataset()
    for step in (0, 3, 7, 8, 20):  # 8 batches of 8 per epoch: steps 8 and 20 are later epochs
        whole = worker_batch(ds, 8, seed=1, step=step, rank=0, world=1, pad_token_id=0)["sample_id"]
        parts = [worker_batch(ds, 8, seed=1, step=step, rank=r, world=2, pad_token_id=0)["sample_id"] for r in (0, 1)]
        assert torch.equal(torch.cat(parts), whole)
    epoch0 = torch.cat([worker_batch(ds, 8, 1, s, 0, 1, 0)["sample_id"] for s in range(8)])
    assert sorted(epoch0.tolist()) == list(range(N))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipelines.ray_runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tinybert")
    tiny("bert", BertForSequenceClassification, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) \
        .save_pretrained(d)
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import load_tokenizer

    load_tokenizer(resolve_model("minilm")).save_pretrained(d)  # the jobs carry the tokenizer to their outputs
    return str(d)


def _cfg(**kw) -> PruneConfig:
    base = dict(budget=vtrans.Budget(params=0.5, tolerance=0.05), steps=16, batch_size=8, lr_masks=5e-2)
    base.update(kw)
    return PruneConfig(**base)


def _masks(out: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "masks.safetensors"))


def _reference_masks(spec: JobSpec, cfg: PruneConfig, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The masks of an uninterrupted run, computed in this process by the library's loop on the job's global batches
    (what a 1-worker job computes; ``test_two_workers_equal_one_worker_with_the_whole_batch`` ties 2 workers to it):
    the fault tests' reference without a Ray Train job of its own."""
    from pipelines.bench.in_process import load_model, train_in_process
    from vtrans.posterior import save_masks
    from vtrans.train import Pruner

    model = load_model(spec.model_dir, spec.task, spec.num_labels, "cpu")
    teacher = load_model(spec.model_dir, spec.task, spec.num_labels, "cpu") if cfg.method != "faster" else None
    pruner = Pruner(model, cfg, teacher)
    train_in_process(pruner, spec.dataset, spec.pad_token_id, "cpu", "reference")
    pruner.finish()
    save_masks(pruner.vib, tmp_path / "reference-masks.safetensors")
    return load_file(str(tmp_path / "reference-masks.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), (k, (a[k].float() - b[k].float()).abs().max())


def test_a_job_in_process_runs_the_workers_loop_without_ray(tiny_dir: str, tmp_path: Path, monkeypatch) -> None:
    """``in_process``: the Train worker's loop as one worker in this process (the benchmark's local executor), the
    same masks as the library's loop on the global batches, the same outputs as a Ray job - and no Ray."""
    import pipelines.train_jobs as jobs

    def no_ray(*a, **k):
        raise AssertionError("an in-process job started Ray")

    monkeypatch.setattr(jobs, "init_ray", no_ray)
    spec = JobSpec(tiny_dir, "seq-cls", _dataset(), pad_token_id=0)
    cfg = _cfg(steps=6)
    job = run_prune_job(spec, cfg, RayConfig(), "here", tmp_path, in_process=True)
    _assert_same(_reference_masks(spec, cfg, tmp_path), _masks(job.output), atol=1e-6)
    out = Path(job.output)
    assert [h["step"] for h in job.history] == list(range(cfg.total_steps)) and job.node_ids == []
    assert (out / "compressed" / "config.json").is_file() and (out / "posterior").is_dir()
    assert not list(Path(job.path).glob("checkpoint_*"))  # nothing to fail over: no checkpoints
    ft = run_finetune_job(JobSpec(str(out / "compressed"), "seq-cls", _dataset(), pad_token_id=0, teacher_dir=tiny_dir),
                          FinetuneConfig(steps=3, batch_size=8), RayConfig(), "ft", tmp_path, in_process=True)
    assert len(ft.history) == 3 and (Path(ft.output) / "model" / "config.json").is_file()
    with pytest.raises(vtrans.ConfigError, match="in process takes no report_to_tune / before_step"):
        run_prune_job(spec, cfg, RayConfig(), "bad", tmp_path, in_process=True, before_step=FailOnce(1, "m"))


@pytest.mark.integration
def test_bad_input_fails_before_any_worker(ray_local, tiny_dir: str, tmp_path: Path) -> None:
    spec = JobSpec(tiny_dir, "seq-cls", _dataset(), pad_token_id=0)
    with pytest.raises(vtrans.ConfigError, match=r"ray.num_workers=3 x 1 CPU needs 3 CPUs, the cluster has 2"):
        run_prune_job(spec, _cfg(batch_size=9), RayConfig(num_workers=3), "bad", tmp_path)
    with pytest.raises(vtrans.ConfigError, match=r"ray.use_gpu=true needs 1 GPU"):
        run_prune_job(spec, _cfg(), RayConfig(use_gpu=True), "bad", tmp_path)
    with pytest.raises(vtrans.ConfigError, match=r"prune.batch_size=9 must be divisible by ray.num_workers=2"):
        run_prune_job(spec, _cfg(batch_size=9), RayConfig(num_workers=2), "bad", tmp_path)
    with pytest.raises(vtrans.ConfigError, match=r"ray.num_workers must be an integer >= 1, got 0"):
        RayConfig(num_workers=0)
    with pytest.raises(vtrans.BudgetError, match="params=1e-05"):
        run_prune_job(spec, _cfg(budget=vtrans.Budget(params=0.00001)), RayConfig(), "bad", tmp_path)
    assert not (tmp_path / "bad").exists()  # no Train run started: its storage folder would be there


@pytest.mark.integration
def test_two_workers_equal_one_worker_with_the_whole_batch(ray_local, tiny_dir: str, tmp_path: Path) -> None:
    spec = JobSpec(tiny_dir, "seq-cls", _dataset(), pad_token_id=0)
    one = run_prune_job(spec, _cfg(), RayConfig(num_workers=1), "one", tmp_path, checkpoint_every=8)
    two = run_prune_job(spec, _cfg(), RayConfig(num_workers=2), "two", tmp_path, checkpoint_every=8)
    # same masks after K=16 steps, up to float summation order in the all-reduce
    _assert_same(_masks(one.output), _masks(two.output), atol=1e-5)
    first = _masks(one.output)["hidden.mu"]
    assert not torch.allclose(first, torch.ones_like(first), atol=1e-3)  # the masks really moved
    assert (Path(one.output) / "compressed" / "model.safetensors").is_file()
    assert len(one.history) == 16 and one.history[-1]["step"] == 15


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, capsys) -> None:
    from pipelines.train_jobs import load_latest_state
    from vtrans.checkpoint import CheckpointError, save_state

    run = tmp_path / "run"
    for step in (4, 9):
        save_state(run / f"checkpoint_{step}", {"w": torch.full((3,), float(step))}, {"step": step})
    tensors, meta = load_latest_state(run / "checkpoint_9", run)
    assert meta["step"] == 9 and "warning" not in capsys.readouterr().out
    data = (run / "checkpoint_9" / "state.safetensors").read_bytes()
    (run / "checkpoint_9" / "state.safetensors").write_bytes(data[:-4] + b"\x00" * 4)
    tensors, meta = load_latest_state(run / "checkpoint_9", run)
    assert meta["step"] == 4 and torch.equal(tensors["w"], torch.full((3,), 4.0))
    out = capsys.readouterr().out
    assert "is corrupted" in out and "resuming from the previous checkpoint" in out and "(step 4)" in out
    (run / "checkpoint_4" / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"corrupted.*no other checkpoint of .* loads; remove that folder"):
        load_latest_state(run / "checkpoint_9", run)


@pytest.mark.integration
def test_resume_past_a_corrupted_checkpoint_ends_with_the_uninterrupted_masks(ray_local, tiny_dir: str,
                                                                             tmp_path: Path) -> None:
    """The job dies after its step-14 checkpoint; that checkpoint is then corrupted on disk. Started again, the job
    detects it by checksum, resumes from the step-9 one and ends exactly where an uninterrupted run ends."""
    from ray.train import TrainingFailedError

    spec = JobSpec(tiny_dir, "seq-cls", _dataset(), pad_token_id=0)
    cfg = _cfg(steps=20)
    ref = _reference_masks(spec, cfg, tmp_path)
    with pytest.raises(TrainingFailedError):
        run_prune_job(spec, cfg, RayConfig(num_workers=1), "bad", tmp_path, checkpoint_every=5,
                      before_step=FailOnce(step=17, marker=str(tmp_path / "f")))
    import json as _json

    ckpts = sorted((d for d in (tmp_path / "bad").glob("checkpoint_*") if d.is_dir()),
                   key=lambda d: _json.loads((d / "state.json").read_text())["step"])
    assert [_json.loads((d / "state.json").read_text())["step"] for d in ckpts] == [9, 14]
    data = (ckpts[-1] / "state.safetensors").read_bytes()
    (ckpts[-1] / "state.safetensors").write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    res = run_prune_job(spec, cfg, RayConfig(num_workers=1), "bad", tmp_path, checkpoint_every=5)
    _assert_same(ref, _masks(res.output), atol=1e-6)
    assert [m["step"] for m in res.history] == list(range(20))


@pytest.mark.integration
def test_a_killed_worker_recovers_with_one_continuing_curve(ray_local, tiny_dir: str, tmp_path: Path) -> None:
    """SIGKILL of a worker at step 10: FailureConfig restarts the group from the step-7 checkpoint; the masks end as
    an uninterrupted run's, and the MLflow run's curve has every step once (steps 8-9, streamed before the kill and
    computed again after it, are not logged twice)."""
    from pipelines.tracking import Tracker

    spec = JobSpec(tiny_dir, "seq-cls", _dataset(), pad_token_id=0)
    cfg = _cfg(steps=16)
    tracker = Tracker.connect(f"sqlite:///{tmp_path / 'mlflow.db'}", "faults")
    run_id = tracker.start_run("prune")
    ref = _reference_masks(spec, cfg, tmp_path)
    rec = run_prune_job(spec, cfg, RayConfig(num_workers=2, max_failures=1), "killed", tmp_path, checkpoint_every=4,
                        report_every=2, tracking={"uri": tracker.uri, "run_id": run_id},
                        before_step=FailOnce(step=10, marker=str(tmp_path / "killed-once"), rank=1, kill=True))
    assert (tmp_path / "killed-once").exists()
    _assert_same(ref, _masks(rec.output), atol=1e-5)  # 2 workers against 1: the all-reduce's summation order
    client = tracker.client
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(16))
    assert len(client.search_runs([tracker.experiment_id])) == 1


@pytest.mark.integration
def test_finetune_job_on_the_compressed_model(ray_local, tiny_dir: str, tmp_path: Path) -> None:
    # the compressed model from the library in this process (the prune job's own compressed output is checked above)
    from vtrans.checkpoint import load_pretrained, load_tokenizer
    from vtrans.scoring import score

    model = load_pretrained(tiny_dir)
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    vib.apply_budget(vtrans.Budget(params=0.5, tolerance=0.05), scores=score(model, "magnitude"), method="magnitude")
    comp = str(tmp_path / "compressed")
    vtrans.compress(vib, tokenizer=load_tokenizer(tiny_dir)).save_pretrained(comp)  # the tokenizer with it
    held_out = _dataset()[:20]
    ft = run_finetune_job(JobSpec(comp, "seq-cls", _dataset()[20:], pad_token_id=0, teacher_dir=tiny_dir,
                                  eval_dataset=held_out),
                          FinetuneConfig(steps=12, batch_size=8, lr=1e-3, eval_every=5), RayConfig(num_workers=2),
                          "ft", tmp_path, checkpoint_every=6)
    out = Path(ft.output) / "model"
    assert (out / "modeling_vtrans.py").is_file()
    assert (out / "tokenizer.json").is_file()
    model = load_pretrained(out)
    assert type(model).__name__ == "VtransBertForSequenceClassification"
    assert vtrans.count(model) == vtrans.count(load_pretrained(comp))
    assert ft.history[-1]["task_loss"] < ft.history[0]["task_loss"] + 0.05
    # held-out quality every 5 steps and at the end, measured on the model as it was: the last one is the saved one's
    evaluated = [(h["step"], h["finetune_step"]) for h in ft.history if "val_accuracy" in h]
    assert evaluated == [(4, 5), (9, 10), (11, 12)]
    from vtrans.evaluate import accuracy

    assert ft.history[-1]["val_accuracy"] == pytest.approx(accuracy(model, held_out, pad_token_id=0))
    import ray

    assert ft.node_ids == [ray.get_runtime_context().get_node_id()] * 2  # one local node, two workers
    assert not [p for p in Path(ft.output).iterdir() if p.name.startswith(".")]  # no temporary directory left


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_between_rounds_two_workers_equal_one_worker_through_a_recovered_failure(ray_local, tiny_dir: str,
                                                                                     tmp_path: Path,
                                                                                     strategy: str) -> None:
    """LoRA fine-tunes between rounds on 2 workers x B/2 (DDP, or FSDP with the model sharded) end with the masks and
    compressed weights of one worker on B (computed in this process): the adapters, made on the wrapped (or sharded)
    model, are replicated and have their gradients averaged by the pruner, and are merged shard by shard; a worker
    failure inside the fine-tune (step 15) resumes from the step-14 checkpoint, which holds the adapters and their
    optimizer state apart from the weights."""
    from pipelines.bench.in_process import load_model, train_in_process
    from vtrans.lora import LoraConfig
    from vtrans.posterior import save_masks
    from vtrans.train import Pruner

    spec = JobSpec(tiny_dir, "seq-cls", _dataset(), pad_token_id=0)
    cfg = _cfg(steps=12, rounds=2, finetune_steps=4, finetune_method="lora", finetune_lr=3e-2,
               lora=LoraConfig(rank=2, alpha=4.0))
    pruner = Pruner(load_model(tiny_dir, "seq-cls", None, "cpu"), cfg, load_model(tiny_dir, "seq-cls", None, "cpu"))
    train_in_process(pruner, spec.dataset, 0, "cpu", "reference")
    pruner.finish()
    save_masks(pruner.vib, tmp_path / "reference-masks.safetensors")
    ref_weights = vtrans.compress(pruner.vib).state_dict()

    job = run_prune_job(spec, cfg, RayConfig(num_workers=2, max_failures=1, strategy=strategy), "lora", tmp_path,
                        checkpoint_every=5, before_step=FailOnce(step=15, marker=str(tmp_path / "f"), rank=1))
    assert (tmp_path / "f").exists()
    _assert_same(load_file(str(tmp_path / "reference-masks.safetensors")), _masks(job.output), atol=1e-5)
    weights = load_file(str(Path(job.output) / "compressed" / "model.safetensors"))
    assert weights.keys() <= ref_weights.keys() and not any("lora_" in k for k in weights)
    _assert_same({k: v for k, v in ref_weights.items() if k in weights}, weights, atol=1e-5)
    assert [m["step"] for m in job.history] == list(range(cfg.total_steps))
    assert [m["step"] for m in job.history if "lr_finetune" in m] == [12, 13, 14, 15]  # the adapters' optimizer


# ---------------------------------------------------------------------------------------------------------------------
# ray.strategy: fsdp (the model sharded over the workers; masks and lambdas whole on each)
# ---------------------------------------------------------------------------------------------------------------------


def test_fsdp_bad_input_fails_in_one_line_before_any_worker(tiny_dir: str, tmp_path: Path) -> None:
    from vtrans.lora import LoraConfig

    with pytest.raises(vtrans.ConfigError) as info:
        RayConfig(num_workers=1, strategy="fsdp")
    assert str(info.value) == ("ray.strategy='fsdp' shards the model over the workers and needs ray.num_workers >= 2, "
                               "got ray.num_workers=1; use ray.strategy='ddp' for one worker")
    with pytest.raises(vtrans.ConfigError, match=r"ray.strategy must be one of \['ddp', 'fsdp'\], got 'zero3'"):
        RayConfig(num_workers=2, strategy="zero3")
    spec = JobSpec(tiny_dir, "seq-cls", _dataset(), pad_token_id=0)
    with pytest.raises(vtrans.ConfigError, match=r"^finetune.lora.target_modules names 'q_proj', which matches no"):
        run_prune_job(spec, _cfg(rounds=2, finetune_steps=2, finetune_method="lora",
                                 lora=LoraConfig(target_modules=["q_proj"])),
                      RayConfig(num_workers=2), "lora", tmp_path)
    assert not (tmp_path / "lora").exists()


@pytest.mark.integration
def test_fsdp_workers_equal_one_worker_through_a_recovered_failure(ray_local, tiny_dir: str, tmp_path: Path) -> None:
    """2 sharded workers x B/2 end with the masks and the compressed weights of one worker on B (computed in this
    process), across rounds (the fine-tune between them included) and a worker failure at step 13 recovered from the
    step-9 checkpoint that rank 0 gathered from the shards."""
    import json

    from pipelines.bench.in_process import load_model, train_in_process
    from vtrans.posterior import save_masks
    from vtrans.train import Pruner

    spec = JobSpec(tiny_dir, "seq-cls", _dataset(), pad_token_id=0)
    cfg = _cfg(steps=12, rounds=2, finetune_steps=4)
    pruner = Pruner(load_model(tiny_dir, "seq-cls", None, "cpu"), cfg, load_model(tiny_dir, "seq-cls", None, "cpu"))
    train_in_process(pruner, spec.dataset, 0, "cpu", "reference")
    pruner.finish()
    save_masks(pruner.vib, tmp_path / "reference-masks.safetensors")
    ref_weights = vtrans.compress(pruner.vib).state_dict()

    job = run_prune_job(spec, cfg, RayConfig(num_workers=2, max_failures=1, strategy="fsdp"), "fsdp", tmp_path,
                        checkpoint_every=5, before_step=FailOnce(step=13, marker=str(tmp_path / "f"), rank=1))
    assert (tmp_path / "f").exists()
    _assert_same(load_file(str(tmp_path / "reference-masks.safetensors")), _masks(job.output), atol=1e-5)
    weights = load_file(str(Path(job.output) / "compressed" / "model.safetensors"))
    _assert_same({k: v for k, v in ref_weights.items() if k in weights}, weights, atol=1e-5)
    assert [m["step"] for m in job.history] == list(range(cfg.total_steps))
    used = json.loads((Path(job.output) / "resources.json").read_text())
    by_rank = used["training_memory_by_rank"]
    assert used["strategy"] == "fsdp" and len(by_rank) == 2
    # each worker holds half of the weights, their gradients and the 2 moments of both AdamWs (pruning, and the
    # fine-tune between rounds): 6 float32 copies in all under ddp; the masks (whole on each) are a few hundred numbers
    whole = 6 * 4 * sum(p.numel() for p in pruner.model.parameters())
    assert all(r["train_state_mb"] * 2**20 < 0.6 * whole for r in by_rank), (by_rank, whole / 2**20)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_finetune_equals_one_worker(ray_local, tiny_dir: str, tmp_path: Path, method: str) -> None:
    """A sharded fine-tune (2 workers, teacher sharded too, held-out evaluation on every rank) ends with the weights
    one worker reaches on the whole batch; with LoRA the adapters are sharded with their layers and merged shard by
    shard before the weights are gathered."""
    from pipelines.bench.in_process import load_model, train_in_process
    from vtrans.finetune import Finetuner
    from vtrans.lora import LoraConfig

    cfg = FinetuneConfig(steps=8, batch_size=8, lr=1e-3 if method == "full" else 3e-2, eval_every=4, method=method,
                         lora=LoraConfig(rank=2, alpha=4.0))
    held_out = _dataset()[:16]
    spec = JobSpec(tiny_dir, "seq-cls", _dataset()[16:], pad_token_id=0, teacher_dir=tiny_dir, eval_dataset=held_out)
    ft = Finetuner(load_model(tiny_dir, "seq-cls", None, "cpu"), cfg, load_model(tiny_dir, "seq-cls", None, "cpu"))
    train_in_process(ft, spec.dataset, 0, "cpu", "reference")
    ref = {k: v.detach() for k, v in ft.finish().state_dict().items()}
    job = run_finetune_job(spec, cfg, RayConfig(num_workers=2, strategy="fsdp"), "ft", tmp_path, checkpoint_every=4)
    got = load_file(str(Path(job.output) / "model" / "model.safetensors"))
    _assert_same({k: v for k, v in ref.items() if k in got}, got, atol=1e-5)
    assert [h["finetune_step"] for h in job.history if "val_accuracy" in h] == [4, 8]
    assert not any("lora_" in k or "base_layer" in k for k in got)
    start = load_model(tiny_dir, "seq-cls", None, "cpu").state_dict()
    assert any((got[k] - start[k]).abs().max() > 1e-4 for k in got if "layer.1" in k)  # the blocks were fine-tuned
