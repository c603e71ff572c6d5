"""Memory per worker of prune jobs on SmolLM2-135M, a few steps: ``ray.strategy`` ddp against fsdp, or the fine-tune
between pruning rounds full against LoRA.

``python -m pipelines.bench.job_memory --compare strategy [--steps 2] [--workers 2] [--out DIR]``: one round, 2
workers under ddp and under fsdp. ``python -m pipelines.bench.job_memory --compare rounds [--steps 2] [--workers 1]``:
two rounds with ``--steps`` fine-tune steps between them, ``finetune_method`` full and lora (rank 8), under ddp. Both
print, per job and rank, the peak and current resident memory and the training state held at the end of training
(weights, gradients, optimizer state: a shard of them under fsdp), as the job's ``resources.json`` records them. Needs
``--workers`` free CPUs on a local Ray and about 7 GB of free memory per SmolLM2 worker under ddp.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

COMPARISONS = ("strategy", "rounds")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", choices=COMPARISONS, default="strategy")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="default: 2 for strategy, 1 for rounds")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    workers = args.workers or (2 if args.compare == "strategy" else 1)

    import vtrans
    from pipelines.config import RayConfig
    from pipelines.train_jobs import JobSpec, run_prune_job
    from vtrans.assets import resolve_model
    from vtrans.lora import LoraConfig
    from vtrans.train import PruneConfig

    model_dir = str(resolve_model("smollm2"))
    g = torch.Generator().manual_seed(0)
    n = 4 * workers
    x = torch.randint(3, 1000, (n, args.seq), generator=g)
    data = [{"input_ids": x[i], "labels": x[i].clone(), "sample_id": torch.tensor(i)} for i in range(n)]
    spec = JobSpec(model_dir, "causal-lm", data, pad_token_id=0)
    base = PruneConfig(task="causal-lm", budget=vtrans.Budget(params=0.5), steps=args.steps, batch_size=workers,
                       init="constant")
    if args.compare == "strategy":
        jobs = {s: (base, RayConfig(num_workers=workers, strategy=s)) for s in ("ddp", "fsdp")}
    else:
        rounds = {"rounds": 2, "finetune_steps": args.steps, "lora": LoraConfig(rank=8, alpha=16.0)}
        jobs = {m: (dataclasses.replace(base, **rounds, finetune_method=m), RayConfig(num_workers=workers))
                for m in ("full", "lora")}
    out = Path(args.out or tempfile.mkdtemp(prefix="job-memory-"))
    rows = []
    for label, (cfg, ray_cfg) in jobs.items():
        job = run_prune_job(spec, cfg, ray_cfg, f"mem-{label}", out, checkpoint_every=10**6)
        used = json.loads((Path(job.output) / "resources.json").read_text())
        for rank, m in enumerate(used["training_memory_by_rank"]):
            rows.append({"job": label, "rank": rank, **{k: round(v) for k, v in m.items()},
                         "wall_s": round(job.wall_time_s)})
    print(f"{args.compare:8} {'rank':>4} {'peak_rss_mb':>11} {'rss_mb':>7} {'train_state_mb':>14} {'wall_s':>6}")
    for r in rows:
        print(f"{r['job']:8} {r['rank']:>4} {r['peak_rss_mb']:>11} {r['rss_mb']:>7} {r['train_state_mb']:>14} "
              f"{r['wall_s']:>6}")


if __name__ == "__main__":
    main()
