"""Benchmark of the three VTrans methods on real models, each a pair of Ray Train jobs (prune, then fine-tune).

    python -m pipelines.bench_train --profile quick [--out runs/bench-train] [--workers 2]

Encoder: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes as the dense teacher, then ``vtrans``, ``fast`` and
``faster`` to 50% of block parameters; prints accuracy (after pruning, after fine-tuning), kept parameters and FLOPs in
both scopes, wall time and the workers' peak RSS. Decoder: SmolLM2-135M on Wikipedia text with ``faster`` to 70% of
block parameters; perplexity before and after, wall time. Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import vtrans
from pipelines.train_jobs import JobSpec, RayConfig, run_finetune_job, run_prune_job
from vtrans.assets import resolve_model
from vtrans.checkpoint import load_pretrained, load_tokenizer
from vtrans.data import (
    CausalLMDataset,
    ClassificationDataset,
    pad_token_id_of,
    rotten_tomatoes,
    stratified_subset,
    train_test_split,
    wikipedia_documents,
)
from vtrans.evaluate import accuracy, perplexity
from vtrans.train import DistillConfig, FinetuneConfig, PruneConfig


@dataclass(frozen=True)
class Profile:
    train_size: int
    test_size: int
    max_length: int
    teacher_steps: int
    prune_steps: dict[str, int]
    finetune_steps: dict[str, int]
    batch_size: int
    lm_chunks: int
    lm_eval_chunks: int
    lm_steps: int
    lm_batch: int


PROFILES = {
    "quick": Profile(train_size=4000, test_size=1000, max_length=64, teacher_steps=250,
                     prune_steps={"vtrans": 300, "fast": 100, "faster": 100},
                     finetune_steps={"vtrans": 150, "fast": 150, "faster": 100}, batch_size=16,
                     lm_chunks=256, lm_eval_chunks=48, lm_steps=60, lm_batch=4),
    "full": Profile(train_size=10_000, test_size=2752, max_length=64, teacher_steps=1200,
                    prune_steps={"vtrans": 2000, "fast": 500, "faster": 500},
                    finetune_steps={"vtrans": 1000, "fast": 1000, "faster": 500}, batch_size=32,
                    lm_chunks=2048, lm_eval_chunks=256, lm_steps=500, lm_batch=8),
}


def _peak_rss_mb(job_output: str) -> float | None:
    f = Path(job_output) / "resources.json"
    return json.loads(f.read_text())["peak_rss_mb"] if f.is_file() else None


def _counts(model) -> dict:
    return vtrans.count(model, seq_len=128).as_dict()


def encoder(p: Profile, out: Path, ray_cfg: RayConfig) -> dict:
    path = str(resolve_model("minilm"))
    tok = load_tokenizer(path)
    pad = pad_token_id_of(tok)
    data = rotten_tomatoes()
    train_idx, test_idx = train_test_split(len(data.texts), p.test_size / len(data.texts), seed=0, labels=data.labels)
    train_idx = [train_idx[j] for j in stratified_subset([data.labels[i] for i in train_idx], count=p.train_size)]
    train = ClassificationDataset(data, tok, max_length=p.max_length, indices=train_idx)
    test = ClassificationDataset(data, tok, max_length=p.max_length, indices=test_idx)
    calib_idx = [train_idx[i] for i in stratified_subset(train.labels, fraction=0.03, seed=0)]
    calib = ClassificationDataset(data, tok, max_length=p.max_length, indices=calib_idx)
    res: dict = {"train": len(train), "test": len(test), "calibration": len(calib), "methods": {}}

    t0 = time.perf_counter()
    teacher_job = run_finetune_job(JobSpec(path, "seq-cls", train, pad, num_labels=2),
                                   FinetuneConfig(steps=p.teacher_steps, lr=1e-4, batch_size=2 * p.batch_size),
                                   ray_cfg, "teacher", out, checkpoint_every=10_000)
    teacher_dir = str(Path(teacher_job.output) / "model")
    teacher = load_pretrained(teacher_dir)
    res["teacher"] = {"accuracy": accuracy(teacher, test, pad), "wall_s": time.perf_counter() - t0,
                      **_counts(teacher)}
    print(f"teacher: accuracy {res['teacher']['accuracy']:.4f}", flush=True)

    for method in ("vtrans", "fast", "faster"):
        t0 = time.perf_counter()
        data_m = calib if method in ("fast", "faster") else train
        cfg = PruneConfig(method=method, budget=vtrans.Budget(params=0.5), steps=p.prune_steps[method],
                          batch_size=p.batch_size, finetune_steps=0, lr_weights=3e-5, lr_masks=2e-2,
                          distill=DistillConfig(hidden_weight=0.5 if method != "faster" else 0.0))
        pruned = run_prune_job(JobSpec(teacher_dir, "seq-cls", data_m, pad), cfg, ray_cfg, f"prune-{method}", out,
                               checkpoint_every=10_000)
        t_prune = time.perf_counter() - t0
        comp_dir = str(Path(pruned.output) / "compressed")
        comp = load_pretrained(comp_dir)
        acc_pruned = accuracy(comp, test, pad)
        ft = run_finetune_job(JobSpec(comp_dir, "seq-cls", train, pad, teacher_dir=teacher_dir),
                              FinetuneConfig(steps=p.finetune_steps[method], lr=5e-5, batch_size=p.batch_size),
                              ray_cfg, f"finetune-{method}", out, checkpoint_every=10_000)
        final = load_pretrained(str(Path(ft.output) / "model"))
        r = {"accuracy_pruned": acc_pruned, "accuracy": accuracy(final, test, pad), "prune_s": t_prune,
             "total_s": time.perf_counter() - t0, "prune_steps": cfg.steps, "prune_data": len(data_m),
             "finetune_steps": p.finetune_steps[method], "peak_rss_mb": _peak_rss_mb(pruned.output),
             "first_loss": pruned.history[0]["loss"], "last_loss": pruned.history[-1]["loss"],
             "first_kl": pruned.history[0]["kl"], "last_kl": pruned.history[-1]["kl"], **_counts(final)}
        res["methods"][method] = r
        print(f"{method}: accuracy pruned {acc_pruned:.4f} fine-tuned {r['accuracy']:.4f} "
              f"params_blocks {r['params_blocks']} prune {t_prune:.0f}s", flush=True)
    return res


def decoder(p: Profile, out: Path, ray_cfg: RayConfig) -> dict:
    path = str(resolve_model("smollm2"))
    tok = load_tokenizer(path)
    pad = pad_token_id_of(tok)
    chunks = CausalLMDataset(wikipedia_documents(), tok, seq_len=128, max_chunks=p.lm_chunks + p.lm_eval_chunks)
    train = torch.utils.data.Subset(chunks, range(p.lm_chunks))
    evals = torch.utils.data.Subset(chunks, range(p.lm_chunks, p.lm_chunks + p.lm_eval_chunks))
    dense = load_pretrained(path)
    ppl_dense = perplexity(dense, evals, pad)
    t0 = time.perf_counter()
    cfg = PruneConfig(method="faster", task="causal-lm", budget=vtrans.Budget(params=0.7), steps=p.lm_steps,
                      batch_size=p.lm_batch, lr_masks=2e-2, distill=DistillConfig(cache_teacher=False))
    pruned = run_prune_job(JobSpec(path, "causal-lm", train, pad), cfg, ray_cfg, "prune-smollm2-faster", out,
                           checkpoint_every=10_000)
    wall = time.perf_counter() - t0
    comp = load_pretrained(str(Path(pruned.output) / "compressed"))
    res = {"perplexity_dense": ppl_dense, "perplexity": perplexity(comp, evals, pad), "wall_s": wall,
           "steps": cfg.steps, "peak_rss_mb": _peak_rss_mb(pruned.output), "dense": _counts(dense),
           "compressed": _counts(comp)}
    print(f"smollm2 faster 0.7: perplexity {ppl_dense:.2f} -> {res['perplexity']:.2f} in {wall:.0f}s", flush=True)
    return res


def _markdown(res: dict) -> str:
    enc, dec = res["encoder"], res["decoder"]
    t = enc["teacher"]
    lines = [f"Machine: {res['machine']}; command: `{res['command']}`; {res['date']}.", "",
             f"all-MiniLM-L6-v2 on Rotten Tomatoes ({enc['train']} train / {enc['test']} test, calibration "
             f"{enc['calibration']}), budget params=0.5 (blocks):", "",
             "| method | accuracy after pruning | accuracy after fine-tune | params blocks | params total | "
             "FLOPs blocks @128 | FLOPs total @128 | prune wall (s) | total wall (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| dense teacher | | {t['accuracy']:.4f} | {t['params_blocks']:,} | {t['params_total']:,} | "
             f"{t['flops_blocks']:,} | {t['flops_total']:,} | | {t['wall_s']:.0f} | |"]
    for m, r in enc["methods"].items():
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else ""
        lines.append(f"| {m} | {r['accuracy_pruned']:.4f} | {r['accuracy']:.4f} | {r['params_blocks']:,} | "
                     f"{r['params_total']:,} | {r['flops_blocks']:,} | {r['flops_total']:,} | {r['prune_s']:.0f} | "
                     f"{r['total_s']:.0f} | {rss} |")
    lines += ["", f"SmolLM2-135M on Wikipedia (seq 128), faster to params=0.7 (blocks), {dec['steps']} steps: "
              f"perplexity {dec['perplexity_dense']:.2f} -> {dec['perplexity']:.2f}, params blocks "
              f"{dec['dense']['params_blocks']:,} -> {dec['compressed']['params_blocks']:,}, "
              f"wall {dec['wall_s']:.0f} s, "
              f"peak RSS {dec['peak_rss_mb'] or 0:.0f} MB (no fine-tune)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.bench_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--out", default="runs/bench-train")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-decoder", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    from pipelines.ray_runtime import init_ray

    init_ray()
    ray_cfg = RayConfig(num_workers=args.workers)
    p = PROFILES[args.profile]
    res = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "command": "python -m pipelines.bench_train " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d"), "profile": args.profile}
    t0 = time.perf_counter()
    res["encoder"] = encoder(p, out, ray_cfg)
    res["decoder"] = decoder(p, out, ray_cfg) if not args.skip_decoder else None
    res["wall_s"] = time.perf_counter() - t0
    res["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "results.json").write_text(json.dumps(res, indent=1))
    if res["decoder"] is not None:
        md = _markdown(res)
        (out / "results.md").write_text(md + "\n")
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
