"""The ``vtrans`` command line.

    vtrans run CONFIG [key=value ...] [--force | --from STAGE]
    vtrans validate CONFIG [key=value ...]
    vtrans inspect MODEL [--seq-len 128]
    vtrans compress --model MODEL --scorer {magnitude,random} --budget params=0.5 --out DIR
                    [--seq-len 128] [--scope blocks|total] [--task auto|base|seq-cls|causal-lm] [--overwrite]

CONFIG is a pipeline YAML (``pipelines/configs/``); ``key=value`` overrides any field (``prune.budget.params=0.3``).
MODEL is a local Hugging Face directory or a built-in name (``minilm``, ``smollm2``). Errors are one line naming the
argument and the value (``--debug`` shows the traceback); no output directory is left half-written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

PROG = "vtrans"
#: ``--seq-len`` when not given: FLOPs at 128 tokens (checked against the model's positions only when given).
DEFAULT_SEQ_LEN = 128


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Compress Hugging Face transformers with VIB-guided structured "
                                "pruning.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a pipeline config end to end on Ray, tracked in MLflow",
                         description="Run a pipeline (calibrate -> teacher -> prune -> finetune -> evaluate) on Ray "
                         "with MLflow tracking. Finished stages with the same inputs are reused.",
                         epilog="example: vtrans run pipelines/configs/minilm-rotten-tomatoes.yaml "
                         "prune.budget.params=0.3 ray.num_workers=1")
    run.add_argument("config", help="pipeline YAML")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (torchtune style)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--force", action="store_true", help="re-run every stage, even finished ones")
    again.add_argument("--from", dest="from_stage", metavar="STAGE",
                       help="re-run this stage and the ones after it (calibrate|teacher|prune|finetune|evaluate)")

    swp = sub.add_parser("sweep", help="a budget sweep of a config's sweep: section on Ray Tune, Pareto fronts in "
                         "MLflow, Pareto models in the registry",
                         description="Run the trials of a sweep config (a pipeline config with a sweep: section) on "
                         "Ray Tune; log the Pareto fronts and register the Pareto-optimal models in MLflow.",
                         epilog="example: vtrans sweep pipelines/configs/sweep-minilm.yaml "
                         "'sweep.space={prune.budget.params: [0.5, 0.3]}'")
    swp.add_argument("config", help="sweep YAML")
    swp.add_argument("overrides", nargs="*", metavar="key=value", help="overrides (sweep.* for the sweep section)")
    swp.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept)")

    rel = sub.add_parser("relog", help="upload to MLflow what a pipeline run could not log while it was down",
                         description="Complete the MLflow side of a finished pipeline run from its records on the "
                         "output root (parent run, stage runs, curves, artifacts, model); idempotent.",
                         epilog="example: vtrans relog runs/minilm-rt-faster50")
    rel.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder <output>/<name> (with summary.json)")
    rel.add_argument("--tracking-uri", help="log there instead of the recorded tracking URI")

    val = sub.add_parser("validate", help="check a pipeline config without running it",
                         description="Load and check a pipeline config (keys, types, model, budget) without Ray; "
                         "print the resolved config and which stages are already finished.")
    val.add_argument("config", help="pipeline YAML")
    val.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    val.add_argument("--quiet", action="store_true", help="print only problems (exit 0 when valid)")

    ins = sub.add_parser("inspect", help="structure counts, parameters and FLOPs of a model",
                         description="Structure counts, parameters and FLOPs (blocks and total) of a model.",
                         epilog="example: vtrans inspect minilm --seq-len 128")
    ins.add_argument("model", help="local Hugging Face directory or built-in name (minilm, smollm2)")
    ins.add_argument("--seq-len", type=int, help="sequence length for FLOPs (default 128; at most the model's "
                     "positions)")
    ins.add_argument("--task", default="auto", help="auto|base|seq-cls|causal-lm (default: from the checkpoint)")

    com = sub.add_parser("compress", help="prune a model to a budget with a training-free scorer and save it",
                         description="Prune a model to a budget with a training-free scorer; save a smaller Hugging "
                         "Face checkpoint (from_pretrained(dir) after `import vtrans`; no trust_remote_code needed).",
                         epilog="example: vtrans compress --model minilm --scorer magnitude --budget params=0.5 "
                         "--out runs/minilm-p50")
    com.add_argument("--model", required=True, help="local Hugging Face directory or built-in name (minilm, smollm2)")
    com.add_argument("--scorer", default="magnitude", help="magnitude | random (default magnitude)")
    com.add_argument("--budget", required=True, help="params=FRACTION|COUNT or flops=FRACTION|COUNT, e.g. params=0.5")
    com.add_argument("--out", required=True, help="output directory (must not exist or be empty, or --overwrite)")
    com.add_argument("--seq-len", type=int, help="sequence length for FLOPs (default 128; at most the model's "
                     "positions)")
    com.add_argument("--scope", default="blocks", help="blocks (transformer layers, default) | total")
    com.add_argument("--task", default="auto", help="auto|base|seq-cls|causal-lm (default: from the checkpoint)")
    com.add_argument("--seed", type=int, default=0, help="seed of the random scorer (default 0)")
    com.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _load(name: str, task: str, seq_len: int | None, dense: bool = False, budget=None):
    """Model, tokenizer and directory of ``--model`` / MODEL; everything that can be checked from the config and the
    weights' headers is, before the weights load: ``--seq-len`` within the model's positions, with ``dense`` a model
    that is not vtrans-compressed already (it cannot be pruned again), an absolute ``budget`` below the dense size."""
    import vtrans
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import (
        check_weights_match_config,
        load_pretrained,
        load_tokenizer,
        meta_model,
        read_config,
    )
    from vtrans.errors import quote

    path = resolve_model(name)
    config = read_config(path)
    adapter = vtrans.arch.for_config(config)  # an unsupported architecture fails before the weights load
    check_weights_match_config(path)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and seq_len is not None and seq_len > limit:  # the default may exceed a tiny model's
        raise vtrans.ConfigError(f"--seq-len {seq_len} is more than the {limit} positions of {quote(name)} "
                                 f"(max_position_embeddings); FLOPs at that length are of no model that can run")
    if dense and adapter.is_compressed(config):
        raise vtrans.ConfigError(f"--model {quote(name)} is already compressed by vtrans (model_type="
                                 f"{config.model_type!r}); compress the dense model it came from to the new budget")
    if budget is not None and isinstance(budget.value, int):  # an absolute count: against the dense size, on meta
        size = vtrans.count(meta_model(path), seq_len=budget.seq_len).get(budget.metric, budget.scope)
        if budget.value >= size:
            raise vtrans.BudgetError(f"--budget {budget.metric}={budget.value} is not below the dense model's "
                                     f"{size:,} {budget.metric} ({budget.scope}); give a smaller count or a fraction "
                                     f"such as {budget.metric}=0.5")
    model = load_pretrained(path, task=task, dtype=torch.float32).eval()
    return model, load_tokenizer(path), path


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    import vtrans
    from vtrans.checkpoint import TASKS

    if args.task not in TASKS:
        raise vtrans.ConfigError(f"--task must be one of {list(TASKS)}, got {args.task!r}")
    if args.seq_len is not None and args.seq_len < 1:
        raise vtrans.ConfigError(f"--seq-len must be a positive integer, got {args.seq_len!r}")
    model, _, path = _load(args.model, args.task, args.seq_len)
    args.seq_len = args.seq_len or DEFAULT_SEQ_LEN
    adapter = vtrans.arch.for_model(model)
    g, keep = adapter.geometry(model), adapter.keep(model)
    c = vtrans.count(model, seq_len=args.seq_len)
    print(f"model: {path}  ({type(model).__name__}, adapter {adapter.name})")
    print(f"layers {g.n_layers}, hidden {keep.hidden}/{g.hidden}, heads {g.heads_per_layer} "
          f"({g.n_groups} kv groups x {g.group_size}), head_dim {g.head_dim}, ffn {g.ffn}")
    rows = [["layer", "attention", "heads", "kv heads", "ffn", "neurons"]]
    for i in range(g.n_layers):
        rows.append([str(i), "kept" if keep.mha[i] else "removed", str(keep.groups[i] * g.group_size),
                     str(keep.groups[i]), "kept" if keep.ffn[i] else "removed", str(keep.neurons[i])])
    print(_table(rows))
    print(_table([["scope", "params", f"FLOPs@{args.seq_len}"],
                  ["blocks", f"{c.params_blocks:,}", f"{c.flops_blocks:,}"],
                  ["total", f"{c.params_total:,}", f"{c.flops_total:,}"]]))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    import vtrans
    from vtrans.checkpoint import TASKS, check_output_dir, write_atomically
    from vtrans.scoring import SCORERS, score

    # every argument is checked before anything is loaded
    budget = vtrans.Budget.parse(args.budget, seq_len=DEFAULT_SEQ_LEN if args.seq_len is None else args.seq_len,
                                 scope=args.scope)
    if args.scorer not in SCORERS:
        raise vtrans.ConfigError(f"--scorer must be one of {list(SCORERS)}, got {args.scorer!r}")
    if args.task not in TASKS:
        raise vtrans.ConfigError(f"--task must be one of {list(TASKS)}, got {args.task!r}")
    # never the current directory, its ancestors, $HOME or the model read (write_atomically replaces --out whole)
    source = [args.model] if os.path.isdir(os.path.expanduser(args.model)) else []
    check_output_dir(args.out, args.overwrite, sources=source)

    t0 = time.perf_counter()
    model, tokenizer, path = _load(args.model, args.task, args.seq_len, dense=True, budget=budget)
    t_load = time.perf_counter() - t0
    dense = vtrans.count(model, seq_len=budget.seq_len)
    # deterministic unit means: a training-free selection must not perturb the kept weights
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    t1 = time.perf_counter()
    vib.apply_budget(budget, scores=score(model, args.scorer, seed=args.seed), method=args.scorer)
    small = vtrans.compress(vib, tokenizer=tokenizer)
    t_compress = time.perf_counter() - t1

    # the compressed model must compute what the masked model computes
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(input_ids=ids), small(input_ids=ids)
    key = "logits" if hasattr(ref, "logits") else "last_hidden_state"
    a, b = getattr(ref, key), getattr(out, key)
    if key == "last_hidden_state":
        a = a[..., vib.selection().hidden]
    err = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-12)
    vib.remove()

    out_dir = write_atomically(args.out, small.save_pretrained, overwrite=args.overwrite, sources=source)
    comp = vtrans.count(small, seq_len=budget.seq_len)
    rows = [["", "dense", "compressed", "ratio"]]
    for metric in ("params", "flops"):
        for scope in ("blocks", "total"):
            d, k = dense.get(metric, scope), comp.get(metric, scope)
            label = f"{metric} ({scope})" + (f" @{budget.seq_len}" if metric == "flops" else "")
            rows.append([label, _fmt(d), _fmt(k), f"{k / d:.4f}"])
    g, keep = vib.geometry, vtrans.arch.for_model(small).keep(small)
    rows.append(["hidden size", str(g.hidden), str(keep.hidden), f"{keep.hidden / g.hidden:.4f}"])
    heads = sum(keep.groups) * g.group_size
    rows.append(["attention heads", str(g.heads_per_layer * g.n_layers), str(heads),
                 f"{heads / (g.heads_per_layer * g.n_layers):.4f}"])
    rows.append(["ffn neurons", str(g.ffn * g.n_layers), str(sum(keep.neurons)),
                 f"{sum(keep.neurons) / (g.ffn * g.n_layers):.4f}"])
    rows.append(["attention / ffn blocks", f"{g.n_layers} / {g.n_layers}", f"{sum(keep.mha)} / {sum(keep.ffn)}", ""])
    print(f"model: {path}  ({type(model).__name__})")
    print(f"budget: {budget.describe()}  scorer: {args.scorer}")
    print(_table(rows))
    print(f"max |masked - compressed| / max |masked| = {err:.2e}")
    print(f"load {t_load:.1f}s, select + compress {t_compress:.1f}s")
    print(f"saved: {out_dir}  (load with vtrans.checkpoint.load_pretrained(dir), or from_pretrained(dir) after "
          f"`import vtrans`)")
    return 0


def _load_config(args: argparse.Namespace):
    from pipelines.config import load_config

    return load_config(args.config, args.overrides)  # a malformed override is a one-line ConfigError there


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from pipelines.config import to_dict
    from pipelines.redact import redact_data
    from pipelines.tracking import check_server
    from pipelines.validate import finished, preflight

    cfg = _load_config(args)
    checked = preflight(cfg)
    uri = cfg.tracking.resolved_uri()
    if uri.startswith(("http://", "https://")):
        check_server(uri)  # what `vtrans run` asks next (Tracker.connect); a local SQLite store is made on first use
    if args.quiet:
        return 0
    print(yaml.safe_dump(redact_data(to_dict(cfg)), sort_keys=False).rstrip())
    print(f"\nmodel: {checked.model_path}")
    done = finished(cfg, checked.keys)
    rows = [["stage", "key", "output"]]
    rows += [[n, k, "finished (will be reused)" if done[n] else "to run"] for n, k in checked.keys.items()]
    print(_table(rows))
    print(f"{args.config}: valid")
    return 0


def _highlights(name: str, r) -> str:
    m = r.metrics
    if name == "calibrate":
        return ", ".join(f"{s} {int(m[f'{s}_samples'])}" for s in ("train", "test", "calibration")
                         if f"{s}_samples" in m)
    if name == "prune" and "params_blocks_ratio" in m:
        return (f"params blocks {m['params_blocks_ratio']:.4f}, FLOPs blocks {m['flops_blocks_ratio']:.4f} of dense"
                + (f", E[size] {m['final_expected_size']:.4f}" if "final_expected_size" in m else ""))
    if name in ("teacher", "finetune") and "final_loss" in m:
        return f"final loss {m['final_loss']:.4f}"
    if name == "evaluate":
        q = [k for k in ("accuracy", "perplexity") if k in m]
        return ", ".join(f"{k} {m[k]:.4f} (dense {m['dense_' + k]:.4f})" for k in q)
    return ""


def cmd_relog(args: argparse.Namespace) -> int:
    from pipelines.relog import relog

    done = relog(args.run_dir, args.tracking_uri)
    for line in done["created"]:
        print(f"created {line}")
    for line in done["completed"]:
        print(f"logged {line}")
    if not done["created"] and not done["completed"]:
        print(f"{args.run_dir}: everything is in MLflow already (parent run {done['parent']})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipelines.dag import run_pipeline

    cfg = _load_config(args)
    run = run_pipeline(cfg, force=args.force, from_stage=args.from_stage)
    rows = [["stage", "status", "key", "wall", "result"]]
    for name, r in run.results.items():
        rows.append([name, r.status, r.key, f"{r.wall_s:.0f}s", _highlights(name, r)])
    print()
    print(_table(rows))
    report = run.results["evaluate"].outputs.get("report_md")
    if report and Path(report).is_file():
        print()
        print(Path(report).read_text().rstrip())
    print()
    print(f"pipeline {run.name}: {run.wall_s:.0f}s; summary {run.summary_path}")
    print(f"MLflow run {run.run_id}: {run.ui}")
    if run.model_uri:
        print(f"compressed model: {run.model_uri}  (mlflow.pyfunc.load_model, or its checkpoint alone: "
              f"pipelines.registry.load_checkpoint)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipelines.sweep import load_sweep
    from pipelines.sweep_runner import run_sweep

    sweep = load_sweep(args.config, args.overrides)
    run = run_sweep(sweep, resume=args.resume)  # checks every model and point (preflight) before Ray
    print()
    stopped = f", {run.stopped} stopped early (ASHA)" if run.stopped else ""
    print(f"sweep {run.name}: {len(run.rows)} trials finished, {run.errors} failed{stopped}")
    for label, versions in run.registered.items():
        for v in versions:
            print(f"registered {label}: version {v.get('version')} {v.get('aliases')} {v.get('model_uri')}")
    print(f"MLflow run {run.run_id}: {run.ui}")
    return 0 if not run.errors else 1


def _unforeseen(e: BaseException) -> str:
    """One line for an exception no check turned into a VtransError: its kind, its reason and the path it names."""
    from vtrans.errors import quote

    if isinstance(e, OSError) and e.strerror:
        where = " ".join(quote(str(f)) for f in (e.filename, e.filename2) if f is not None)
        return f"{type(e).__name__}: {e.strerror}{': ' + where if where else ''}"
    if isinstance(e, RecursionError):
        return "RecursionError: an input is nested too deeply"
    return f"{type(e).__name__}: {quote(' '.join(str(e).split()))[1:-1]}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vtrans`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from safetensors import SafetensorError

    from vtrans.errors import VtransError

    handlers = {"run": cmd_run, "sweep": cmd_sweep, "validate": cmd_validate, "inspect": cmd_inspect,
                "compress": cmd_compress, "relog": cmd_relog}
    try:
        return handlers[args.command](args)
    except VtransError as e:
        if args.debug:
            raise
        from pipelines.redact import redact

        # one line; a message may quote a URI with credentials
        print(f"{PROG}: error: {redact(' '.join(str(e).splitlines()))}", file=sys.stderr)
        return 2
    except (OSError, RecursionError, SafetensorError) as e:  # a path, a file or a nesting the checks did not foresee
        if args.debug or (isinstance(e, OSError) and e.filename is None):  # not about a path: its traceback helps
            raise
        from pipelines.redact import redact

        print(f"{PROG}: error: {redact(_unforeseen(e))} (--debug shows where)", file=sys.stderr)
        return 2
    except Exception:
        if args.debug:
            raise
        import traceback

        from pipelines.redact import redact

        text = traceback.format_exc()
        if redact(text) == text:
            raise  # nothing to hide: Python's own report
        print(redact(text).rstrip(), file=sys.stderr)  # e.g. MLflow's "API request to http://user:pw@host failed"
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

