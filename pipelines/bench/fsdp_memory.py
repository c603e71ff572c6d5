"""Memory per worker of a prune job under ``ray.strategy: ddp`` and ``fsdp``: SmolLM2-135M, 2 workers, a few steps.

``python -m pipelines.bench.fsdp_memory [--steps 2] [--workers 2] [--out DIR]`` prints, per strategy and rank, the
peak and current resident memory and the training state held (weights, gradients, AdamW state: a shard of them under
fsdp), as the job's ``resources.json`` records them at the end of training. Needs ``--workers`` free CPUs on a local
Ray, and about 7 GB of free memory for SmolLM2 under ddp.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import vtrans
    from pipelines.config import RayConfig
    from pipelines.train_jobs import JobSpec, run_prune_job
    from vtrans.assets import resolve_model
    from vtrans.train import PruneConfig

    model_dir = str(resolve_model("smollm2"))
    g = torch.Generator().manual_seed(0)
    n = 4 * args.workers
    x = torch.randint(3, 1000, (n, args.seq), generator=g)
    data = [{"input_ids": x[i], "labels": x[i].clone(), "sample_id": torch.tensor(i)} for i in range(n)]
    spec = JobSpec(model_dir, "causal-lm", data, pad_token_id=0)
    cfg = PruneConfig(task="causal-lm", budget=vtrans.Budget(params=0.5), steps=args.steps, batch_size=args.workers,
                      init="constant")
    out = Path(args.out or tempfile.mkdtemp(prefix="fsdp-memory-"))
    rows = []
    for strategy in ("ddp", "fsdp"):
        job = run_prune_job(spec, cfg, RayConfig(num_workers=args.workers, strategy=strategy), f"mem-{strategy}", out,
                            checkpoint_every=10**6)
        used = json.loads((Path(job.output) / "resources.json").read_text())
        for rank, m in enumerate(used["training_memory_by_rank"]):
            rows.append({"strategy": strategy, "rank": rank, **{k: round(v) for k, v in m.items()},
                         "wall_s": round(job.wall_time_s)})
    print(f"{'strategy':8} {'rank':>4} {'peak_rss_mb':>11} {'rss_mb':>7} {'train_state_mb':>14} {'wall_s':>6}")
    for r in rows:
        print(f"{r['strategy']:8} {r['rank']:>4} {r['peak_rss_mb']:>11} {r['rss_mb']:>7} {r['train_state_mb']:>14} "
              f"{r['wall_s']:>6}")


if __name__ == "__main__":
    main()
