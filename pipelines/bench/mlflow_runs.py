"""MLflow: a child run per result row, the parent run's summary metrics, latency figures on the rows' runs and the
table of every row.
"""

from __future__ import annotations

import math

from pipelines.bench import stats

EXPERIMENT = "benchmarks"
"""The MLflow experiment of the benchmark's runs (``--experiment``)."""
ROW_METRICS = ("quality", "params_blocks", "params_total", "flops_blocks", "flops_total", "target_params_blocks",
               "compress_s", "train_s", "threshold_s", "finetune_s", "final_expected_size", "final_kl")


def _row_run_name(r: dict) -> str:
    return f"{r['task']}/{r['method']}/p{r['budget']:g}/s{r['seed']}/{'finetuned' if r['finetuned'] else 'pruned'}"


def log_row(tracker, parent: str, r: dict, metric: str, dense: dict) -> str:
    """One child run per result row: its identity as params and tags, its numbers as metrics."""
    params = {"task": r["task"], "method": r["method"], "budget": r["budget"], "seed": r["seed"],
              "finetuned": r["finetuned"], "prune_steps": r.get("prune_steps"), "finetune_steps":
              r.get("finetune_steps", 0), "finetune_method": r.get("finetune_method")}
    tags = {f"bench.{k}": v for k, v in params.items() if k in ("task", "method", "budget", "seed", "finetuned")}
    tags["bench.cached"] = r.get("cached", False)
    run_id = tracker.start_run(_row_run_name(r), parent, params={k: v for k, v in params.items() if v is not None},
                               tags=tags)
    m = {k: float(r[k]) for k in ROW_METRICS if isinstance(r.get(k), (int, float)) and not isinstance(r[k], bool)}
    m[metric] = float(r["quality"])
    if "quality_second" in r:  # the second text (TaskProfile.second_text)
        m[f"{metric}_second"] = float(r["quality_second"])
    m.update({k: float(v) for k, v in r.items() if k.startswith("lm_eval_")})  # TaskProfile.lm_eval_tasks
    m["budget_met"] = float(bool(r["budget_met"]))
    for k in stats.SIZE_KEYS:
        m[f"{k}_fraction"] = r[k] / dense[k]
    for stage, v in (r.get("rss") or {}).items():
        m[f"{stage}_peak_rss_mb"] = v["peak_rss_mb"]
        m[f"{stage}_rss_delta_mb"] = v["delta_mb"]
    tracker.log_metrics(run_id, {k: v for k, v in m.items() if math.isfinite(v)})
    tracker.end_run(run_id)
    return run_id


def summary_metrics(results: dict) -> dict[str, float]:
    """The parent run's metrics: per (task, method, budget, fine-tuned) mean and std, ratios, overhead."""
    out: dict[str, float] = {}
    for label, task in results["tasks"].items():
        metric = task["metric"]
        out[f"{label}.dense.{metric}"] = task["dense"]["quality"]
        for (_, m, b, ft), st in stats.aggregate(task["rows"]).items():
            key = f"{label}.{m}.p{b:g}.{'finetuned' if ft else 'pruned'}.{metric}"
            out[f"{key}_mean"] = st.mean
            if st.std is not None:
                out[f"{key}_std"] = st.std
        for k, v in stats.time_ratios(task).items():
            out[f"{label}.{k}"] = v
        for e in (task.get("latency") or {}).get("models", []):
            for b, v in e["timings"].items():
                out[f"{label}.{e['method']}.p{e['budget']:g}.speedup_b{b}"] = v["speedup"]
                out[f"{label}.{e['method']}.p{e['budget']:g}.speedup_per_flops_b{b}"] = v["speedup_per_flops"]
    if results.get("overhead"):
        out["ray_overhead_ratio"] = results["overhead"]["ratio"]
        out["ray_overhead_extra_s"] = results["overhead"]["extra_s"]
    out["wall_s"] = results["wall_s"]
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _log_latency(tracker, rows: list[dict], latency: dict | None) -> None:
    """Latency figures on the seed-0 rows' runs (pruned and fine-tuned share the architecture)."""
    if not latency:
        return
    by = {(e["method"], e["budget"]): e for e in latency["models"]}
    for r in rows:
        e = by.get((r["method"], r["budget"]))
        if e is None or r["seed"] != 0:
            continue
        m = {"flops_reduction": e["flops_reduction"]}
        for b, v in e["timings"].items():
            m.update({f"latency_ms_b{b}": v["median_ms"], f"throughput_b{b}": v["throughput"],
                      f"speedup_b{b}": v["speedup"], f"speedup_per_flops_b{b}": v["speedup_per_flops"]})
        r["latency"] = e["timings"]
        tracker.log_metrics(r["run_id"], m)


def _log_table(tracker, parent: str | None, results: dict) -> None:
    """Every row as one MLflow table of the parent run (``rows.json``: the UI's table view)."""
    import pandas as pd

    if parent is None:  # the store went offline: results.json holds the same
        return
    flat = [{k: v for k, v in r.items() if not isinstance(v, dict)} for task in results["tasks"].values()
            for r in task["rows"]]
    tracker.call("log table", tracker.client.log_table, parent, data=pd.DataFrame(flat), artifact_file="rows.json")
