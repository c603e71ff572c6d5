"""The benchmark's numbers turned into statements: the markdown report, the Pareto plot, the check of the issue's
expected shape and the results sections of ``pipelines/BENCHMARKS.md``. Pure python (+ matplotlib for the plot);
reads the ``results.json`` structure that :mod:`pipelines.bench` writes and never touches Ray or MLflow. The seed
statistics and ratios are :mod:`pipelines.bench.stats`.

```python
from pipelines.bench.report import plot_pareto, render_markdown
from pipelines.bench.stats import aggregate
stats = aggregate(rows)                        # {(task, method, budget, finetuned): Stat(mean, std, n)}
md = render_markdown(results)                  # every table of results.md
plot_pareto(results["tasks"]["minilm"], "runs/bench/pareto-minilm.png")
```
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.bench.stats import (
    BASELINES,
    METHOD_ORDER,
    SIZE_KEYS,
    VIB_METHODS,
    Stat,
    aggregate,
    mean_std,
    time_ratios,
)
from vtrans.metrics import HIGHER_IS_BETTER

# ---------------------------------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def _budget_label(b: float) -> str:
    return f"{b:g}"


def _methods(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    present = {r["method"] for r in rows}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _budgets(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    return sorted({r["budget"] for r in rows}, reverse=True)


def _best(stats: dict[tuple, Stat], keys: list[tuple], higher: bool) -> set[tuple]:
    vals = {k: stats[k].mean for k in keys if k in stats}
    if not vals:
        return set()
    best = max(vals.values()) if higher else min(vals.values())
    return {k for k, v in vals.items() if v == best}


def lm_eval_keys(task: Mapping[str, Any]) -> list[str]:
    """The lm-eval scores the task's rows carry (``lm_eval_<task>_<metric>``; not the example counts)."""
    return sorted({k for r in task["rows"] for k in r if k.startswith("lm_eval_") and not k.endswith("_samples")
                   and not k.endswith("_stderr")})


def quality_tables(task: Mapping[str, Any], value: str = "quality") -> list[str]:
    """Quality per method x budget, without and with the fine-tune (mean ± std over seeds; the best of each column
    in bold); ``value="quality_second"``: on the task's second text, ``value="lm_eval_<task>_<metric>"``: an lm-eval
    score (rows without it: no tables)."""
    rows, metric = [r for r in task["rows"] if value in r], task["metric"]
    if not rows:
        return []
    stats = aggregate(rows, value)
    higher = HIGHER_IS_BETTER[metric]
    if value.startswith("lm_eval_"):  # accuracies up, perplexities down
        metric, higher = value, not value.endswith("perplexity")
    budgets, methods = _budgets(rows), _methods(rows)
    label = task["label"]
    out: list[str] = []
    for ft in (False, True):
        title = "after the fine-tune" if ft else "without fine-tune"
        if value == "quality_second":
            title += f", on {task.get('second_name') or 'the second text'} (never seen in pruning or fine-tuning)"
        dense = task["dense"].get(value)
        out += [f"{metric} {title} (dense teacher: {'-' if dense is None else f'{dense:.4f}'}; "
                f"{'higher' if higher else 'lower'} is better; bold: best of the column):", ""]
        table = []
        for m in methods:
            cells = []
            for b in budgets:
                k = (label, m, b, ft)
                if k not in stats:
                    cells.append("")
                    continue
                best = _best(stats, [(label, mm, b, ft) for mm in methods], higher)
                s = stats[k].fmt()
                cells.append(f"**{s}**" if k in best and len(methods) > 1 else s)
            table.append([m, *cells])
        out += _table(["method", *[f"params {_budget_label(b)}" for b in budgets]], table) + [""]
    return out


def size_table(task: Mapping[str, Any]) -> list[str]:
    """Achieved parameters and FLOPs (both scopes) of seed 0 against the target; 'met' over every seed's row."""
    rows, dense, tol = task["rows"], task["dense"], task["tolerance"]
    by = {}
    met: dict[tuple, list[bool]] = {}
    for r in rows:
        if r["finetuned"]:
            continue
        key = (r["method"], r["budget"])
        met.setdefault(key, []).append(bool(r["budget_met"]))
        if r["seed"] == 0 or key not in by:
            by[key] = r
    table = []
    for (m, b), r in sorted(by.items(), key=lambda kv: (-kv[0][1], METHOD_ORDER.index(kv[0][0])
                                                       if kv[0][0] in METHOD_ORDER else 99)):
        fr = [r[k] / dense[k] for k in SIZE_KEYS]
        ok = met[(m, b)]
        table.append([m, _budget_label(b), f"{int(b * dense['params_blocks']):,}", f"{r['params_blocks']:,}",
                      *[f"{f:.4f}" for f in fr], f"{'yes' if all(ok) else 'NO'} ({sum(ok)}/{len(ok)})"])
    head = ["method", "target", "target params blocks", "params blocks", "params blocks / dense",
            "params total / dense", "FLOPs blocks / dense", "FLOPs total / dense",
            f"met (within {tol:.1%} under)"]
    return [f"dense: params blocks {dense['params_blocks']:,}, params total {dense['params_total']:,}, FLOPs blocks "
            f"{dense['flops_blocks']:,}, FLOPs total {dense['flops_total']:,} (FLOPs at seq "
            f"{dense['seq_len']}):", "", *_table(head, table), ""]


def latency_table(task: Mapping[str, Any]) -> list[str]:
    """Median latency and throughput of each compressed model vs dense, speedup and speedup ÷ FLOPs reduction."""
    lat = task.get("latency")
    if not lat:
        return ["(latency not measured)", ""]
    batches = lat["batch_sizes"]
    dense = {int(k): v for k, v in lat["dense"].items()}
    head = ["method", "budget", "FLOPs reduction"]
    for b in batches:
        head += [f"b{b} ms (dense {dense[b]['median_ms']:.1f})", f"b{b} seq/s", f"b{b} speedup",
                 f"b{b} speedup ÷ FLOPs red."]
    table = []
    for e in sorted(lat["models"], key=lambda e: (-e["budget"], METHOD_ORDER.index(e["method"])
                                                   if e["method"] in METHOD_ORDER else 99)):
        cells = [e["method"], _budget_label(e["budget"]), f"{e['flops_reduction']:.2f}x"]
        for b in batches:
            t = e["timings"][str(b)]
            cells += [f"{t['median_ms']:.1f}", f"{t['throughput']:.1f}", f"{t['speedup']:.2f}x",
                      f"{t['speedup_per_flops']:.2f}"]
        table.append(cells)
    drift = lat.get("dense_end")
    note = ""
    if drift:
        parts = [f"b{b}: {dense[b]['median_ms']:.1f} -> {drift[str(b)]['median_ms']:.1f} ms" for b in batches]
        note = "Dense latency measured before and after the compressed models (load drift): " + ", ".join(parts) + "."
    return [f"{lat['device']}, {lat['threads']} thread(s), seq {lat['seq_len']}, random token ids, median of "
            f"{lat['repeats']} after {lat['warmup']} warm-up passes; seed-0 model of each method and budget (the "
            f"fine-tune does not change the architecture):", "", *_table(head, table), "",
            *([note, ""] if note else [])]


def ops_table(task: Mapping[str, Any]) -> list[str]:
    """Where a forward pass spends its time (``vtrans.latency.op_times``) for dense and each compressed model: the
    matrix multiplications (what FLOPs count) against the rest, and the matmul-only speedup ÷ FLOPs reduction. When
    the matmuls keep pace with the FLOPs and the whole does not, the rest (attention, norms, embeddings, element-wise
    ops) is why."""
    lat = task.get("latency") or {}
    dense = lat.get("dense_ops")
    entries = [e for e in lat.get("models", []) if e.get("ops")]
    if not dense or not entries:
        return []
    cats = ("matmul", "attention", "norm", "other")

    def cells(ops: Mapping[str, float]) -> list[str]:
        return [f"{ops[c]:.2f}" for c in cats] + [f"{ops['total']:.2f}", f"{ops['matmul'] / ops['total']:.0%}"]

    table = [["dense", "1", "1.00x", *cells(dense), "", ""]]
    for e in sorted(entries, key=lambda e: (-e["budget"], METHOD_ORDER.index(e["method"])
                                            if e["method"] in METHOD_ORDER else 99)):
        ops = e["ops"]
        mm = dense["matmul"] / ops["matmul"] if ops["matmul"] > 0 else math.inf
        rest = (dense["total"] - dense["matmul"]) / max(ops["total"] - ops["matmul"], 1e-9)
        table.append([e["method"], _budget_label(e["budget"]), f"{e['flops_reduction']:.2f}x", *cells(ops),
                      f"{mm / e['flops_reduction']:.2f}", f"{rest:.2f}x"])
    head = ["model", "budget", "FLOPs reduction", *[f"{c} ms" for c in cats], "total ms", "matmul share",
            "matmul speedup ÷ FLOPs red.", "rest speedup"]
    return [f"Where the time goes: torch.profiler self time per forward pass at batch {lat.get('ops_batch_size', 1)} "
            f"x seq {lat['seq_len']} (profiled apart from the timing above; the profiler's own overhead inflates "
            f"small ops), by operator: matmul (what FLOPs count), attention (SDPA / softmax), norm (LayerNorm / "
            f"RMSNorm kernels; transformers' Llama RMSNorm is element-wise ops and counts as other), other "
            f"(embeddings, activations, adds, copies):", "", *_table(head, table), ""]


def time_table(task: Mapping[str, Any]) -> list[str]:
    """Compression wall time per method (mean over its runs) and the Faster-VTrans ÷ VTrans ratio."""
    runs: dict[str, list[Mapping[str, Any]]] = {}
    for r in task["rows"]:
        if not r["finetuned"]:
            runs.setdefault(r["method"], []).append(r)
    table = []
    for m in _methods(task["rows"]):
        rs = runs.get(m, [])
        if not rs:
            continue
        # a shared posterior is trained once per seed: count each training once
        seen, times = set(), []
        for r in rs:
            key = (r["seed"], r.get("compress_group") or r["budget"])
            if key not in seen:
                seen.add(key)
                times.append(r["compress_s"])
        st = mean_std(times)
        steps = rs[0].get("prune_steps")
        shared = "one run for all budgets" if rs[0].get("compress_group") else "one run per budget"
        samples = rs[0].get("prune_samples")
        table.append([m, st.fmt(1), len(times), steps if steps is not None else "",
                      f"{st.mean / steps:.2f}" if steps else "", samples if samples is not None else "", shared])
    lines = _table(["method", "compression wall s (mean ± std, n runs)", "runs", "steps", "s per step",
                    "samples", "runs cover"], table) + [""]
    r = time_ratios(task)
    if r:
        lines += [f"Faster-VTrans ÷ VTrans compression time: {r['faster_over_vtrans']:.3f}, i.e. Faster-VTrans "
                  f"{1 / r['faster_over_vtrans']:.1f}x as fast"
                  + (f"; per optimizer step {r['faster_over_vtrans_per_step']:.3f}"
                     if "faster_over_vtrans_per_step" in r else "") + ".", ""]
    ft = [r["finetune_s"] for r in task["rows"] if r["finetuned"] and r.get("finetune_s")]
    if ft:
        lines += [f"Fine-tune wall time per run (every method the same steps): {mean_std(ft).fmt(1)}.", ""]
    return lines


def memory_table(task: Mapping[str, Any]) -> list[str]:
    stages = task.get("stages") or {}
    table = [[name, f"{v['peak_rss_mb']:.0f}", f"{v['delta_mb']:.0f}", v.get("runs", 1)]
             for name, v in stages.items()]
    return _table(["stage", "peak RSS MB (process)", "peak above the stage's start MB", "runs (max shown)"],
                  table) + [""]


def overhead_tables(ov: Mapping[str, Any]) -> list[str]:
    """The Ray-overhead comparison: the same stages through the DAG on local Ray and in one plain process."""
    head = ["stage", "DAG on Ray: stage s", "plain process s", "ratio", "DAG worker peak RSS MB",
            "plain process peak RSS MB (stage)"]
    table = []
    for name in ov["stages"]:
        d, p = ov["dag"]["stages"].get(name, {}), ov["local"]["stages"].get(name, {})
        ds, ps = d.get("wall_s"), p.get("wall_s")
        rt = f"{ds / ps:.2f}" if ds and ps else ""
        table.append([name, f"{ds:.1f}" if ds is not None else "", f"{ps:.1f}" if ps is not None else "", rt,
                      f"{d['peak_rss_mb']:.0f}" if d.get("peak_rss_mb") else "",
                      f"{p['peak_rss_mb']:.0f}" if p.get("peak_rss_mb") else ""])
    table.append(["**whole pipeline (driver wall)**", f"{ov['dag']['wall_s']:.1f}", f"{ov['local']['wall_s']:.1f}",
                  f"**{ov['ratio']:.2f}**", "", ""])
    return [f"Config: {ov['description']}. Starting the local Ray took {ov['ray_init_s']:.1f} s (not counted). The DAG "
            f"side also does what a pipeline run does beyond the work: an MLflow run per stage, streamed curves, "
            f"checkpoints and the logged pyfunc model.", "", *_table(head, table), ""]


# ---------------------------------------------------------------------------------------------------------------------
# the expected shape
# ---------------------------------------------------------------------------------------------------------------------


def check_claims(task: Mapping[str, Any]) -> list[str]:
    """The issue's expected shape checked against one task's numbers, as markdown bullets."""
    rows, metric, label = task["rows"], task["metric"], task["label"]
    stats = aggregate(rows)
    higher = HIGHER_IS_BETTER[metric]
    budgets = _budgets(rows)
    out = []
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    for ft in (False, True):
        wins, losses = [], []
        for b in budgets:
            vib = [stats[k].mean for m in ("vtrans", "fast") if (k := (label, m, b, ft)) in stats]
            base = [(m, stats[k].mean) for m in BASELINES if (k := (label, m, b, ft)) in stats]
            if not vib or not base:
                continue
            best_vib = max(vib) if higher else min(vib)
            beaten_by = [m for m, v in base if not better(best_vib, v)]
            (losses if beaten_by else wins).append(f"{_budget_label(b)}" + (f" (beaten or tied by "
                                                                             f"{', '.join(beaten_by)})"
                                                                             if beaten_by else ""))
        if wins or losses:
            verdict = "confirmed" if not losses else "contradicted"
            out.append(f"- VTrans/Fast-VTrans dominate the baselines ({'with' if ft else 'without'} fine-tune): "
                       f"**{verdict}**; better at {', '.join(wins) or 'no budget'}"
                       + (f"; not at {'; '.join(losses)}" if losses else "") + ".")
    if metric == "accuracy" and 0.5 in budgets:
        dense = task["dense"]["quality"]
        for m in ("vtrans", "fast"):
            k = (label, m, 0.5, True)
            if k in stats:
                drop = (dense - stats[k].mean) * 100
                verdict = "confirmed" if drop <= 1 else "contradicted"
                out.append(f"- {m} loses <= 1 accuracy point at 50% (fine-tuned): **{verdict}** ({drop:+.1f} points: "
                           f"{stats[k].mean:.4f} vs dense {dense:.4f}).")
    r = time_ratios(task)
    if r:
        speed = 1 / r["faster_over_vtrans"]
        cost = []
        for b in budgets:
            a, v = (label, "faster", b, True), (label, "vtrans", b, True)
            if a in stats and v in stats:
                d = stats[v].mean - stats[a].mean
                cost.append(f"{_budget_label(b)}: {d * 100:+.1f} points" if metric == "accuracy"
                            else f"{_budget_label(b)}: {stats[a].mean / stats[v].mean:.2f}x perplexity")
        verdict = "confirmed" if speed >= 10 else "contradicted"
        how = "VTrans minus Faster" if metric == "accuracy" else "Faster / VTrans"
        out.append(f"- Faster-VTrans >= 10x faster than VTrans: **{verdict}** ({speed:.1f}x)"
                   + (f"; quality cost vs VTrans after fine-tune ({how}): {', '.join(cost)}" if cost else "") + ".")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the whole report
# ---------------------------------------------------------------------------------------------------------------------


def cache_notes(results: Mapping[str, Any]) -> list[str]:
    """What came from the caches of an earlier invocation (rows, data, teacher): their numbers and times are from
    then; latency and the Ray overhead are measured by every invocation."""
    out = []
    for label, task in results["tasks"].items():
        rows = task["rows"]
        cached = sum(bool(r.get("cached")) for r in rows)
        setup = {k: v.get("status") for k, v in (task.get("setup") or {}).items()}
        from_cache = [k for k, v in setup.items() if v == "cached"]
        if cached or from_cache:
            out.append(f"{label}: {cached} of {len(rows)} rows" + (f", the {' and the '.join(from_cache)}"
                                                                   if from_cache else "")
                       + " came from the cache of an earlier invocation with the same settings (their quality, sizes "
                         "and compression / fine-tune times were measured then; latency is measured every time).")
    return out


def render_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: what ran, then per task quality, sizes, latency, compression time, memory, the expected
    shape, and the Ray overhead."""
    lines = [f"# Benchmark `{results['profile']}`", "",
             f"Machine: {results['machine']}. Command: `{results['command']}`. Date: {results['date']}. "
             f"Device: {results['device']}; executor: {results['executor']}. Wall time: {results['wall_s']:.0f} s "
             f"({results['wall_s'] / 60:.1f} min).", "",
             f"MLflow: experiment `{results['mlflow']['experiment']}`, parent run `{results['mlflow']['run_id']}` in "
             f"`{results['mlflow']['uri']}`.", "",
             *([("Phases: " + "; ".join(f"{k} {v:.0f} s" for k, v in results["phases"].items()) + "."), ""]
               if results.get("phases") else []),
             "## What this profile did", "", *[f"- {line}" for line in results["what_ran"]], ""]
    for label, task in results["tasks"].items():
        lines += [f"## {label}: {task['model_name']} on {task['data_name']} ({task['metric']})", ""]
        lines += quality_tables(task)
        lines += quality_tables(task, "quality_second")
        for key in lm_eval_keys(task):
            lines += quality_tables(task, key)
        lines += [f"Pareto plot: `pareto-{label}.png`.", "", "### Achieved size vs target", ""]
        lines += size_table(task)
        lines += ["### Latency and throughput", ""] + latency_table(task) + ops_table(task)
        lines += ["### Compression wall time", ""] + time_table(task)
        lines += ["### Peak memory per stage", ""] + memory_table(task)
        claims = check_claims(task)
        if claims:
            lines += ["### The expected shape, checked", "", *claims, ""]
    if results.get("overhead"):
        lines += ["## Ray overhead: the same stages through the DAG on local Ray vs one plain process", ""]
        lines += overhead_tables(results["overhead"])
    notes = [*cache_notes(results), *results.get("notes", [])]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines).rstrip() + "\n"


def plot_pareto(task: Mapping[str, Any], path: str | Path) -> Path:
    """Quality vs achieved block-parameter fraction, one line per method (mean over seeds, std as error bars),
    without and with the fine-tune side by side; the dense model as a star; perplexity on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, metric, label, dense = task["rows"], task["metric"], task["label"], task["dense"]
    quality = aggregate(rows)
    size = aggregate(rows, value="params_blocks")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, ft in zip(axes, (False, True)):
        for m in _methods(rows):
            pts = sorted((size[k].mean / dense["params_blocks"], quality[k].mean, quality[k].std or 0.0)
                         for k in quality if k[1] == m and k[3] == ft)
            pts = [p for p in pts if math.isfinite(p[1])]
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, lw=1.4, capsize=2,
                        ls="-" if m in VIB_METHODS else "--", label=m)
        ax.scatter([1.0], [dense["quality"]], marker="*", s=180, color="black", zorder=5, label="dense")
        ax.set(xlabel="block parameters / dense", title=f"{label}: {'after fine-tune' if ft else 'no fine-tune'}")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["check_claims", "plot_pareto", "render_markdown"]


# ---------------------------------------------------------------------------------------------------------------------
# the results section of the benchmark report (pipelines/BENCHMARKS.md)
# ---------------------------------------------------------------------------------------------------------------------


def readme_markers(profile: str) -> tuple[str, str]:
    """The lines between which the benchmark report (``pipelines/BENCHMARKS.md``) holds a profile's results (written
    by the command, never by hand)."""
    return f"<!-- bench:{profile}:start -->", f"<!-- bench:{profile}:end -->"


def has_readme_markers(text: str, profile: str) -> bool:
    start, end = readme_markers(profile)
    return text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end)


def readme_section(results: Mapping[str, Any]) -> str:
    """``results.md`` with its headings two levels down (it sits under the "Benchmark profiles" section of
    ``pipelines/BENCHMARKS.md``)."""
    body = render_markdown(results).splitlines()
    body = [("##" + line) if line.startswith("#") else line for line in body]
    return "\n".join(body).rstrip() + "\n"


def update_readme(path: str | Path, results: Mapping[str, Any]) -> None:
    """Replace the section of ``results["profile"]`` (between :func:`readme_markers`) in the markdown file ``path``
    with :func:`readme_section`; written to a temporary file and renamed, so a failure leaves the file as it was."""
    import os

    path = Path(path)
    text = path.read_text()
    profile = results["profile"]
    if not has_readme_markers(text, profile):
        start, end = readme_markers(profile)
        raise ValueError(f"{path} needs exactly one {start!r} line before one {end!r} line")
    start, end = readme_markers(profile)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{start}\n{readme_section(results)}{end}{tail}"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
