"""Hardware-aware budgets measured on this machine (issue 20): widths aligned to multiples of 8 / 32 / 64 against
unaligned ones, and latency budgets against parameter budgets at equal measured latency.

``python -m pipelines.bench.hardware --task minilm --out runs/hardware-minilm`` (``--task smollm2`` for the decoder)
prepares the task as the quick profile does (its data; for MiniLM its 200-step teacher, trained here in one process),
then prunes the teacher with Kwon et al.'s retraining-free selection (training-free, so every row is comparable and
cheap) to every ``--budgets`` fraction, once as a parameter budget and once as a latency budget, at every ``--aligns``
alignment (1 = unaligned). Each row: quality (accuracy / perplexity on the test split, no fine-tune), block parameters
and FLOPs kept, the latency table's prediction, the measured median latency at ``--batch-size`` x ``--seq-len`` on
``--threads`` threads, the speedup over the dense model timed right before it and speedup ÷ FLOPs reduction. The
latency rows add measured latency against their target (the budget times that dense timing); the comparison at equal
measured speedup interpolates the quality of the parameter-budget rows of the same alignment at each latency row's
speedup. Writes ``results.json`` and ``results.md`` to ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from vtrans.errors import ConfigError, VtransError

TASKS = {"minilm": "encoder", "smollm2": "decoder"}


def _fraction_list(text: str, key: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{key}={text!r} must be comma-separated fractions in (0, 1), e.g. 0.7,0.5") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise ConfigError(f"{key}={text!r} must be comma-separated fractions in (0, 1), e.g. 0.7,0.5")
    return sorted(set(values), reverse=True)


def _int_list(text: str, key: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{key}={text!r} must be comma-separated integers >= 1, e.g. 1,8,32,64") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{key}={text!r} must be comma-separated integers >= 1, e.g. 1,8,32,64")
    return sorted(set(values))


def _check_args(args: argparse.Namespace) -> tuple[list[float], list[int]]:
    """The budgets and alignments of the command line, every flag checked before any work (one-line errors)."""
    from vtrans.checks import check_int

    for key, minimum in (("batch_size", 1), ("seq_len", 1), ("threads", 1), ("repeats", 1), ("warmup", 0)):
        check_int(f"--{key.replace('_', '-')}", getattr(args, key), minimum)
    if args.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be one of ['cpu', 'cuda'], got {args.device!r}")
    return _fraction_list(args.budgets, "--budgets"), _int_list(args.aligns, "--aligns")


def prune_rows(fresh: Callable[[], Any], batches: list[dict], quality: Callable[[Any], float], table,
               budgets: Sequence[float], aligns: Sequence[int], timing: Callable[[Any], float], *,
               batch_size: int, seq_len: int, tolerance: float, dense_ms: Callable[[], float],
               metrics: Iterable[str] = ("params", "latency"), log: Callable[[str], None] = print) -> list[dict]:
    """One row per (metric, budget, alignment): Kwon's selection of ``fresh()`` (a new dense model each time) on
    ``batches``, compressed, scored by ``quality``, predicted by ``table`` and timed by ``timing`` (median ms) right
    after ``dense_ms()`` times the dense model: the row's speedup and latency target are against that adjacent dense
    timing, so a machine whose speed drifts during the run (a shared host) compares like with like. A budget no
    aligned selection meets is a row with its one-line ``error`` instead of numbers."""
    import vtrans
    from vtrans.errors import BudgetError
    from vtrans.fisher import kwon_prune

    dense_flops = None
    rows = []
    for metric in metrics:
        for b in budgets:
            for a in aligns:
                row: dict[str, Any] = {"metric": metric, "budget": b, "align": a}
                model = fresh().eval()
                if dense_flops is None:
                    dense_counts = vtrans.count(model, seq_len=seq_len)
                    dense_flops, dense_params = dense_counts.flops_total, dense_counts.params_blocks
                vib = vtrans.attach(model)
                budget = vtrans.Budget(**{metric: b}, seq_len=seq_len, batch_size=batch_size, tolerance=tolerance,
                                       align=None if a == 1 else a)
                t0 = time.perf_counter()
                try:
                    sel = kwon_prune(vib, batches, budget, table=table if metric == "latency" else None)
                except (BudgetError, ConfigError) as e:
                    row["error"] = str(e).splitlines()[0]
                    log(f"{metric}={b:g} align {a}: {row['error']}")
                    rows.append(row)
                    continue
                small = vtrans.compress(vib).eval()
                row["select_s"] = time.perf_counter() - t0
                counts = vtrans.count(small, seq_len=seq_len)
                keep = sel.keep()
                predicted = table.predict(keep)
                row.update(params_blocks=counts.params_blocks, params_fraction=counts.params_blocks / dense_params,
                           flops_reduction=dense_flops / counts.flops_total, quality=quality(small),
                           predicted_ms=predicted, predicted_speedup=table.dense_ms / predicted,
                           dense_ms=dense_ms(), measured_ms=timing(small),
                           heads=sum(keep.groups), neurons=sum(keep.neurons), hidden=keep.hidden)
                row["speedup"] = row["dense_ms"] / row["measured_ms"]
                row["speedup_per_flops"] = row["speedup"] / row["flops_reduction"]
                if metric == "latency":
                    row["target_ms"] = b * row["dense_ms"]
                    row["measured_of_target"] = row["measured_ms"] / row["target_ms"]
                log(f"{metric}={b:g} align {a}: quality {row['quality']:.4f}, params {row['params_fraction']:.3f}, "
                    f"predicted {row['predicted_ms']:.2f} ms, measured {row['measured_ms']:.2f} ms, speedup "
                    f"{row['speedup']:.2f}x (÷FLOPs {row['speedup_per_flops']:.2f})")
                rows.append(row)
                del small, vib, model
    return rows


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """The value at ``x`` on the piecewise-linear curve through ``(x, y)`` points; None outside their range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]


def at_equal_latency(rows: Sequence[dict]) -> list[dict]:
    """For every latency-budget row: the quality the parameter-budget rows of the same alignment reach at its measured
    speedup (each row's measured latency over the dense timing right before it: a drift of the machine's speed between
    rows cancels), interpolated between their speedups; None outside them."""
    out = []
    for r in rows:
        if r["metric"] != "latency" or "error" in r:
            continue
        params = [(p["speedup"], p["quality"]) for p in rows
                  if p["metric"] == "params" and p["align"] == r["align"] and "error" not in p]
        out.append({"budget": r["budget"], "align": r["align"], "speedup": r["speedup"],
                    "quality_latency_budget": r["quality"],
                    "quality_params_budget": interpolate(params, r["speedup"])})
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render(results: dict) -> str:
    q = results["metric"]
    lines = [f"### {results['model_name']} ({q}, Kwon et al. selection, no fine-tune)", "",
             f"`{results['command']}` — {results['machine']}, {results['date']}; latency at batch "
             f"{results['batch_size']} x seq {results['seq_len']}, {results['threads']} thread(s), median of "
             f"{results['repeats']}; dense {q} {results['dense_quality']:.4f}, dense {results['dense_ms']:.2f} ms "
             f"measured at the start ({results['dense_end_ms']:.2f} ms at the end; each row's speedup is against the "
             f"dense timing taken right before it), {results['dense_predicted_ms']:.2f} ms predicted by the table.",
             ""]
    for metric, title in (("params", "Parameter budgets"), ("latency", "Latency budgets")):
        rows = [r for r in results["rows"] if r["metric"] == metric]
        if not rows:
            continue
        extra = " measured ÷ target |" if metric == "latency" else ""
        lines += [f"#### {title}", "", f"| budget | align | {q} | params kept | FLOPs reduction | predicted ms | "
                  f"measured ms | dense ms (adjacent) |{extra} predicted speedup | speedup | speedup ÷ FLOPs |",
                  "|---|---|---|---|---|---|---|---|" + ("---|" if extra else "") + "---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['budget']:g} | {r['align']} | {r['error']} |")
                continue
            ratio = f" {r['measured_of_target']:.3f} |" if metric == "latency" else ""
            lines.append(f"| {r['budget']:g} | {r['align']} | {r['quality']:.4f} | {r['params_fraction']:.3f} | "
                         f"{r['flops_reduction']:.2f}x | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | "
                         f"{r['dense_ms']:.2f} |{ratio} {r['predicted_speedup']:.2f}x | {r['speedup']:.2f}x | "
                         f"{r['speedup_per_flops']:.2f} |")
        lines.append("")
    eq = results["equal_latency"]
    if eq:
        lines += ["#### Latency budget against parameter budget at equal measured speedup", "",
                  f"| latency budget | align | measured speedup | {q}, latency budget | {q}, parameter budgets "
                  f"(interpolated) |", "|---|---|---|---|---|"]
        for e in eq:
            lines.append(f"| {e['budget']:g} | {e['align']} | {e['speedup']:.2f}x | "
                         f"{e['quality_latency_budget']:.4f} | {_fmt(e['quality_params_budget'], '.4f')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="example: python -m pipelines.bench.hardware --task smollm2 "
                                       "--budgets 0.8,0.7,0.5 --out runs/hardware-smollm2")
    p.add_argument("--task", choices=sorted(TASKS), default="minilm", help="the quick profile's task (default minilm)")
    p.add_argument("--budgets", default="0.7,0.5,0.3", help="fractions in (0, 1): each a params and a latency budget")
    p.add_argument("--aligns", default="1,8,32,64", help="width alignments (1 = unaligned)")
    p.add_argument("--batch-size", type=int, default=1, help="latency batch size (default 1)")
    p.add_argument("--seq-len", type=int, default=128, help="latency sequence length (default 128)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the table and the timings (default 1)")
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes per model (median; default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes before them (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=None, help="output folder (default runs/hardware-TASK)")
    args = p.parse_args(argv)
    try:
        budgets, aligns = _check_args(args)
    except VtransError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out or f"runs/hardware-{args.task}").resolve()
    out.mkdir(parents=True, exist_ok=True)

    from pipelines.bench.cells import _kwon_batches, load_split_ds
    from pipelines.bench.in_process import load_model
    from pipelines.bench.measure import _log, torch_threads
    from pipelines.bench.profiles import load_profile
    from pipelines.bench.run import machine
    from pipelines.bench.tasks import prepare_task
    from vtrans import latency_table
    from vtrans.latency import time_forward
    from vtrans.metrics import measure

    kind = TASKS[args.task]
    t = getattr(load_profile("quick"), kind)
    started = time.time()
    with torch_threads(max(2, args.threads)):  # the teacher's training (MiniLM): both cores
        setup = prepare_task(kind, t, out, args.device, executor="local")
    train, test = load_split_ds(setup, "train"), load_split_ds(setup, "test")
    batches = _kwon_batches(train, t, 0, setup.pad_token_id)

    def fresh():
        return load_model(setup.teacher_dir, setup.task, setup.num_labels, args.device)

    def timing(model) -> float:
        return time_forward(model, args.batch_size, args.seq_len, repeats=args.repeats,
                            warmup=args.warmup).median_ms

    def quality(model) -> float:
        return measure(setup.metric, model, test, setup.pad_token_id, t.eval_batch)

    # one thread count for the table, the selections and the timings (a table is only valid at its own)
    with torch_threads(args.threads):
        dense = fresh().eval()
        # measured now, not read from the cache: a table from another hour of a shared host predicts another speed
        table = latency_table.table_for(dense, args.batch_size, args.seq_len, cache=False)
        dense_ms = timing(dense)
        _log(f"{args.task}: dense {dense_ms:.2f} ms measured, {table.dense_ms:.2f} ms predicted")
        rows = prune_rows(fresh, batches, quality, table, budgets, aligns, timing, batch_size=args.batch_size,
                          seq_len=args.seq_len, tolerance=t.tolerance, dense_ms=lambda: timing(dense), log=_log)
        dense_end = timing(dense)
    command = "python -m pipelines.bench.hardware " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"task": args.task, "model_name": setup.model_name, "metric": setup.metric,
               "dense_quality": setup.dense["quality"], "dense_ms": dense_ms, "dense_end_ms": dense_end,
               "dense_predicted_ms": table.dense_ms, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "threads": args.threads, "repeats": args.repeats, "device": args.device, "budgets": budgets,
               "aligns": aligns, "rows": rows, "equal_latency": at_equal_latency(rows), "command": command,
               "machine": machine(), "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - started}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = render(results)
    (out / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
