"""Latency: the dense model and every compressed one timed in the driver, one after the other, with fixed threads.
"""

from __future__ import annotations

from pipelines.bench import stats
from pipelines.bench.in_process import load_model
from pipelines.bench.measure import PeakRSS, _log, torch_threads
from pipelines.bench.profiles import LatencyProfile
from pipelines.bench.tasks import TaskSetup


def measure_latency(setup: TaskSetup, lat: LatencyProfile, models: list[tuple[str, float, str]],
                    device: str) -> dict:
    """Dense, then every compressed model, then dense again (the drift), one after the other with fixed threads."""
    import vtrans
    from vtrans.latency import op_times, time_forward

    def timings(path: str, ops: bool = True) -> tuple[dict[str, dict], int, dict[str, float] | None]:
        model = load_model(path, setup.task, setup.num_labels, device).eval()
        flops = vtrans.count(model, seq_len=lat.seq_len).flops_total
        out = {}
        for b in lat.batch_sizes:
            tm = time_forward(model, b, lat.seq_len, repeats=lat.repeats, warmup=lat.warmup)
            out[str(b)] = {"median_ms": tm.median_ms, "p90_ms": tm.p90_ms, "throughput": tm.throughput,
                           "tokens_per_s": tm.tokens_per_s}
        # where the time goes at the smallest batch (profiled separately: the profiler slows what it watches)
        split = op_times(model, min(lat.batch_sizes), lat.seq_len, repeats=max(1, min(3, lat.repeats)),
                         warmup=min(1, lat.warmup)) if ops else None
        del model
        return out, flops, split

    with torch_threads(lat.threads), PeakRSS() as rss:
        dense, dense_flops, dense_ops = timings(setup.teacher_dir)
        entries = []
        for method, budget, path in models:
            tm, flops, ops = timings(path)
            red = stats.flops_reduction(dense_flops, flops)
            for b, v in tm.items():
                v["speedup"] = stats.speedup(dense[b]["median_ms"], v["median_ms"])
                v["speedup_per_flops"] = stats.speedup_per_flops(v["speedup"], red)
            entries.append({"method": method, "budget": budget, "flops_total": flops, "flops_reduction": red,
                            "timings": tm, "ops": ops})
            _log(f"{setup.label} latency {method} p{budget:g}: " + ", ".join(
                f"b{b} {v['median_ms']:.1f} ms ({v['speedup']:.2f}x, ÷FLOPs {v['speedup_per_flops']:.2f})"
                for b, v in tm.items()))
        dense_end, _, _ = timings(setup.teacher_dir, ops=False)
    return {"device": device, "threads": lat.threads if device == "cpu" else None, "seq_len": lat.seq_len,
            "repeats": lat.repeats, "warmup": lat.warmup, "batch_sizes": lat.batch_sizes, "dense": dense,
            "dense_end": dense_end, "dense_flops_total": dense_flops, "dense_ops": dense_ops,
            "ops_batch_size": min(lat.batch_sizes), "models": entries, "rss": rss.as_dict()}
