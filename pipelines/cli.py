"""The ``vtrans`` command line.

    vtrans run CONFIG [key=value ...] [--force | --from STAGE] [--verbose]
    vtrans sweep CONFIG [key=value ...] [--resume] [--verbose]
    vtrans validate CONFIG [key=value ...] [--quiet]
    vtrans configs
    vtrans inspect MODEL [--seq-len 128]
    vtrans compress --model MODEL --scorer {magnitude,random} --budget params=0.5 --out DIR
                    [--seq-len 128] [--scope blocks|total] [--task auto|base|seq-cls|causal-lm] [--uniform]
                    [--align N|heads=A,neurons=B,hidden=C]
                    [--overwrite]
    vtrans export DIR --format stock --out OUT [--overwrite]
    vtrans --version

CONFIG is a pipeline or sweep YAML, or the name of a shipped one (``vtrans configs`` lists them); ``key=value``
overrides any field (``prune.budget.params=0.3``). MODEL is a local Hugging Face directory, a built-in name
(``minilm``, ``smollm2``) or a hub id (``org/name``; from the local Hugging Face cache when ``HF_HUB_OFFLINE=1``).
Options may come before, between or after the positionals. Errors are one line naming the argument and the value
(``--debug`` shows the traceback); no output directory is left half-written.

Building the parser, ``--help`` and ``--version`` import neither torch nor transformers, Ray or MLflow: every
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

PROG = "vtrans"
#: ``--seq-len`` when not given: FLOPs at 128 tokens (checked against the model's positions only when given).
DEFAULT_SEQ_LEN = 128
#: Distributions whose versions ``--version`` prints after vtrans's own.
VERSIONS_OF = ("torch", "transformers", "ray", "mlflow")
#: Where the shipped configs live inside the installed ``pipelines`` package.
CONFIGS_PACKAGE = "pipelines"
CONFIGS_DIR = "configs"
#: Longest description `vtrans configs` prints.
DESCRIPTION_WIDTH = 100


class _IntermixedParser(argparse.ArgumentParser):
    """A command's parser that takes its options anywhere (``vtrans run CONFIG --force a=1``): argparse's
    ``parse_intermixed_args``, which a parser with subcommands cannot use itself, applied inside each command."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        if self._inner:  # parse_known_intermixed_args calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return super().parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


class _Version(argparse.Action):
    """``--version``: vtrans's version and its stack's, read from the installed distributions (nothing imported)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):  # noqa: A002
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        from importlib.metadata import PackageNotFoundError, version

        def of(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "not installed"

        print(f"{PROG} {of('vtrans')} (python {sys.version.split()[0]}; "
              + ", ".join(f"{n} {of(n)}" for n in VERSIONS_OF) + ")")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Compress Hugging Face transformers with VIB-guided structured "
                                "pruning.", epilog="`vtrans COMMAND --help` explains a command, with an example. "
                                "Options may come anywhere on the line.")
    p.add_argument("--version", action=_Version, help="print the versions of vtrans, torch, transformers, ray and "
                   "mlflow and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--verbose", action="store_true", help="show Ray's, transformers' and MLflow's log lines on the "
                   "console too (also VTRANS_LOG=debug); they always go to the log files")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_IntermixedParser)

    def verbose(cmd: argparse.ArgumentParser) -> None:  # accepted after the command too
        cmd.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="show Ray's, transformers' and MLflow's log lines on the console too (also "
                         "VTRANS_LOG=debug); they are always in <output>/<name>/vtrans.log and Ray's session logs")

    config_help = "pipeline YAML, or the name of a shipped config (see `vtrans configs`)"
    run = sub.add_parser("run", help="run a pipeline config end to end on Ray, tracked in MLflow",
                         description="Run a pipeline (calibrate -> teacher -> prune -> finetune -> evaluate) on Ray "
                         "with MLflow tracking. Finished stages with the same inputs are reused. The console shows "
                         "progress, stage results and errors; --verbose adds Ray's, transformers' and MLflow's lines.",
                         epilog="example: vtrans run minilm-rotten-tomatoes prune.budget.params=0.3 ray.num_workers=1 "
                         "--force")
    run.add_argument("config", help=config_help)
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (torchtune style)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--force", action="store_true", help="re-run every stage, even finished ones")
    again.add_argument("--from", dest="from_stage", metavar="STAGE",
                       help="re-run this stage and the ones after it (calibrate|teacher|prune|finetune|evaluate)")
    verbose(run)

    swp = sub.add_parser("sweep", help="a budget sweep of a config's sweep: section on Ray Tune, Pareto fronts in "
                         "MLflow, Pareto models in the registry",
                         description="Run the trials of a sweep config (a pipeline config with a sweep: section) on "
                         "Ray Tune; log the Pareto fronts and register the Pareto-optimal models in MLflow.",
                         epilog="example: vtrans sweep sweep-minilm "
                         "'sweep.space={prune.budget.params: [0.5, 0.3]}'")
    swp.add_argument("config", help="sweep YAML, or the name of a shipped one (see `vtrans configs`)")
    swp.add_argument("overrides", nargs="*", metavar="key=value", help="overrides (sweep.* for the sweep section)")
    swp.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept)")
    verbose(swp)

    rel = sub.add_parser("relog", help="upload to MLflow what a pipeline run could not log while it was down",
                         description="Complete the MLflow side of a finished pipeline run from its records on the "
                         "output root (parent run, stage runs, curves, artifacts, model); idempotent.",
                         epilog="example: vtrans relog runs/minilm-rt-faster50")
    rel.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder <output>/<name> (with summary.json)")
    rel.add_argument("--tracking-uri", help="log there instead of the recorded tracking URI")

    val = sub.add_parser("validate", help="check a pipeline or sweep config without running it",
                         description="Load and check a pipeline config (keys, types, model, budget) without Ray; "
                         "print the resolved config and which stages are already finished. A sweep config (with a "
                         "sweep: section) is checked as `vtrans sweep` checks it before Ray starts - every model at "
                         "every grid point - and summarised: models, trials, what is cached.",
                         epilog="examples: vtrans validate minilm-rotten-tomatoes prune.budget.params=0.3; "
                         "vtrans validate sweep-minilm --quiet")
    val.add_argument("config", help="pipeline or sweep YAML, or the name of a shipped one (see `vtrans configs`)")
    val.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (sweep.* for a sweep)")
    val.add_argument("--quiet", action="store_true", help="print only problems (exit 0 when valid)")

    sub.add_parser("configs", help="list the shipped configs (usable by name in run, validate and sweep)",
                   description="List the configs shipped with vtrans and what each one does; pass a name to "
                   "run / validate / sweep instead of a path.", epilog="example: vtrans configs")

    model_help = ("local Hugging Face directory, built-in name (minilm, smollm2) or hub id org/name (offline: from "
                  "the local Hugging Face cache)")
    ins = sub.add_parser("inspect", help="structure counts, parameters and FLOPs of a model",
                         description="Structure counts, parameters and FLOPs (blocks and total) of a model.",
                         epilog="examples: vtrans inspect minilm --seq-len 128; "
                         "vtrans inspect sentence-transformers/all-MiniLM-L6-v2")
    ins.add_argument("model", help=model_help)
    ins.add_argument("--seq-len", type=int, help="sequence length for FLOPs (default 128; at most the model's "
                     "positions)")
    ins.add_argument("--task", default="auto", help="auto|base|seq-cls|causal-lm (default: from the checkpoint)")

    com = sub.add_parser("compress", help="prune a model to a budget with a training-free scorer and save it",
                         description="Prune a model to a budget with a training-free scorer; save a smaller Hugging "
                         "Face checkpoint (from_pretrained(dir) after `import vtrans`; no trust_remote_code needed).",
                         epilog="example: vtrans compress --model minilm --scorer magnitude --budget params=0.5 "
                         "--out runs/minilm-p50")
    com.add_argument("--model", required=True, help=model_help)
    com.add_argument("--scorer", default="magnitude", help="magnitude | random (default magnitude)")
    com.add_argument("--budget", required=True, help="params=FRACTION|COUNT, flops=FRACTION|COUNT or latency=FRACTION "
                     "(of the dense model's latency predicted by a table measured on this machine), e.g. params=0.5")
    com.add_argument("--out", required=True, help="output directory (must not exist or be empty, or --overwrite)")
    com.add_argument("--seq-len", type=int, help="sequence length for FLOPs (default 128; at most the model's "
                     "positions)")
    com.add_argument("--scope", default="blocks", help="blocks (transformer layers, default) | total")
    com.add_argument("--task", default="auto", help="auto|base|seq-cls|causal-lm (default: from the checkpoint)")
    com.add_argument("--seed", type=int, default=0, help="seed of the random scorer (default 0)")
    com.add_argument("--uniform", action="store_true", help="the same heads / FFN width in every layer, saved as the "
                     "stock architecture (model_type llama|bert|roberta|gpt2; loads without vtrans)")
    com.add_argument("--align", help="every kept width a multiple of N (FFN neurons, hidden size, attention width = "
                     "kept key/value groups x head_dim), or per structure: heads=A,neurons=B,hidden=C; the budget "
                     "stays an upper bound and how close it lands is printed")
    com.add_argument("--latency-batch", type=int, default=1, help="batch size of a latency budget (default 1); its "
                     "sequence length is --seq-len")
    com.add_argument("--latency-repeats", type=int, default=10, help="timed forward passes per latency measurement "
                     "(default 10)")
    com.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    exp = sub.add_parser("export", help="write a vtrans checkpoint as the stock architecture (loads without vtrans)",
                         description="Write a vtrans-compressed checkpoint as the stock Hugging Face architecture "
                         "(model_type llama|bert|roberta|gpt2, no auto_map, no modeling file) computing the same "
                         "outputs: every layer zero-padded to common widths (this gives up the speedup of the pruned "
                         "widths; `vtrans compress --uniform` keeps it). A pruned hidden size under LayerNorm (BERT, "
                         "RoBERTa, GPT-2) cannot be padded exactly and is refused.",
                         epilog="example: vtrans export runs/smollm2-p50 --format stock --out runs/smollm2-p50-stock")
    exp.add_argument("dir", metavar="DIR", help="a checkpoint directory written by vtrans compress or a pipeline")
    exp.add_argument("--format", required=True, help="stock (the only format so far)")
    exp.add_argument("--out", required=True, help="output directory (must not exist or be empty, or --overwrite)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


# ---------------------------------------------------------------------------------------------------------------------
# shipped configs and models by name
# ---------------------------------------------------------------------------------------------------------------------


def shipped_configs() -> dict[str, Path]:
    """Name (file stem) -> path of every config shipped in the installed package (``pipelines/configs/*.yaml``)."""
    from importlib.resources import files

    root = files(CONFIGS_PACKAGE) / CONFIGS_DIR
    return {Path(f.name).stem: Path(str(f)) for f in sorted(root.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")}


def config_description(path: Path) -> str:
    """A config's one-line description: its ``description:`` key when it has one, else the first sentence of the
    comment block at its top."""
    text = path.read_text(encoding="utf-8")
    lines = []
    for line in text.splitlines():
        if line.startswith("description:"):
            return line.partition(":")[2].strip().strip("'\"")
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    head = " ".join(lines)
    end = head.find(". ")
    head = head[: end + 1] if end >= 0 else head
    return head if len(head) <= DESCRIPTION_WIDTH else head[: head.rfind(" ", 0, DESCRIPTION_WIDTH - 3)] + " ..."


def resolve_config(arg: str) -> str:
    """CONFIG as given when such a file (or anything) exists there, else the shipped config of that name (with or
    without ``.yaml``). A bare name that is neither is a one-line error listing the shipped names."""
    from vtrans.errors import ConfigError, quote

    if os.path.lexists(arg) or os.sep in arg or "/" in arg:  # a path: read_yaml reports what is wrong with it
        return arg
    name = arg[: -len(".yaml")] if arg.endswith(".yaml") else arg[: -len(".yml")] if arg.endswith(".yml") else arg
    shipped = shipped_configs()
    if name in shipped:
        return str(shipped[name])
    import difflib

    close = difflib.get_close_matches(name, list(shipped), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    raise ConfigError(f"config file {quote(arg)} not found (relative to {Path.cwd()}), and no shipped config is named "
                      f"{quote(name)}{hint} Shipped: {sorted(shipped)} (vtrans configs)")


def _looks_like_hub_id(name: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) is not None and not os.path.lexists(name)


def resolve_model_arg(name: str, key: str) -> Path:
    """MODEL / ``--model``: a built-in name or local directory, else a hub id (``org/name``) from the local Hugging
    Face cache (or downloaded when the hub is reachable and ``HF_HUB_OFFLINE`` is not set)."""
    from vtrans.assets import MODELS, resolve_model

    if name in MODELS or not _looks_like_hub_id(name):
        return resolve_model(name)
    from pipelines.validate import resolve_model_path

    return resolve_model_path(name, key=key)


def _load(name: str, task: str, seq_len: int | None, dense: bool = False, budget=None, key: str = "MODEL"):
    """Model, tokenizer and directory of ``--model`` / MODEL; everything that can be checked from the config and the
    weights' headers is, before the weights load: ``--seq-len`` within the model's positions, with ``dense`` a model
    that is not vtrans-compressed already (it cannot be pruned again), an absolute ``budget`` below the dense size."""
    import torch

    import vtrans
    from vtrans.checkpoint import (
        check_weights_match_config,
        load_pretrained,
        load_tokenizer,
        meta_model,
        read_config,
    )
    from vtrans.errors import quote

    path = resolve_model_arg(name, key)
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
    if budget is not None and budget.aligned:  # an alignment wider than a structure fails before the weights load
        from vtrans.budget import align_steps

        meta = meta_model(path)
        align_steps(vtrans.arch.for_model(meta).geometry(meta), budget)
    if budget is not None and budget.uniform:  # a budget no uniform shape reaches fails before the weights load
        from vtrans.uniform import check_reachable

        meta = meta_model(path)
        meta_adapter = vtrans.arch.for_model(meta)
        check_reachable(meta_adapter.geometry(meta), budget, meta_adapter.stock_rules(meta))
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
    import torch

    import vtrans
    from vtrans.checkpoint import TASKS, check_output_dir, write_atomically
    from vtrans.checks import check_int
    from vtrans.config import parse_align
    from vtrans.scoring import SCORERS, score

    # every argument is checked before anything is loaded
    align = None if args.align is None else parse_align(args.align)
    check_int("--latency-batch", args.latency_batch, 1, what="a positive integer")
    check_int("--latency-repeats", args.latency_repeats, 1, what="a positive integer")
    budget = vtrans.Budget.parse(args.budget, seq_len=DEFAULT_SEQ_LEN if args.seq_len is None else args.seq_len,
                                 scope=args.scope, uniform=args.uniform, align=align, batch_size=args.latency_batch)
    if args.scorer not in SCORERS:
        raise vtrans.ConfigError(f"--scorer must be one of {list(SCORERS)}, got {args.scorer!r}")
    if args.task not in TASKS:
        raise vtrans.ConfigError(f"--task must be one of {list(TASKS)}, got {args.task!r}")
    # never the current directory, its ancestors, $HOME or the model read (write_atomically replaces --out whole)
    source = [args.model] if os.path.isdir(os.path.expanduser(args.model)) else []
    check_output_dir(args.out, args.overwrite, sources=source)

    t0 = time.perf_counter()
    model, tokenizer, path = _load(args.model, args.task, args.seq_len, dense=True, budget=budget, key="--model")
    t_load = time.perf_counter() - t0
    dense = vtrans.count(model, seq_len=budget.seq_len)
    table = None
    if budget.metric == "latency":  # the table (cached or measured now), and an unreachable target, before any work
        from vtrans import latency_table

        table = latency_table.table_for(model, budget.batch_size, budget.seq_len, repeats=args.latency_repeats)
        print(f"latency table: {'cache hit' if table.cached else 'measured'} ({table.key['device']}, "
              f"{table.key['threads']} threads, batch {budget.batch_size} x seq {budget.seq_len}): dense "
              f"{table.dense_ms:.2f} ms predicted, {table.dense_measured_ms:.2f} ms measured")
        latency_table.check_reachable(vtrans.arch.for_model(model).geometry(model), budget, table)
    # deterministic unit means: a training-free selection must not perturb the kept weights
    vib = vtrans.attach(model, vtrans.VIBConfig(mu_init_std=0.0, logvar_init_std=0.0))
    t1 = time.perf_counter()
    sel = vib.apply_budget(budget, scores=score(model, args.scorer, seed=args.seed), method=args.scorer, table=table)
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
    measured = None
    if table is not None:  # measured vs predicted, recorded in compression.json
        from vtrans.latency import time_forward

        measured = time_forward(small, budget.batch_size, budget.seq_len, repeats=args.latency_repeats).median_ms
        small.config.vtrans["report"]["latency"]["measured_ms"] = measured

    _made_by(small, ["vtrans", "compress", "--model", args.model, "--scorer", args.scorer, "--budget", args.budget,
                     "--scope", args.scope, "--seq-len", str(budget.seq_len), "--task", args.task,
                     "--seed", str(args.seed), *(["--uniform"] if args.uniform else []),
                     *(["--latency-batch", str(args.latency_batch)] if table is not None else []),
                     *(["--align", args.align] if args.align is not None else []), "--out", args.out])
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
    if table is not None:
        a = sel.achieved
        print(f"latency: predicted {a['predicted_ms']:.2f} ms = {a['fraction']:.2%} of the dense {a['dense']:.2f} ms "
              f"(target {a['target_ms']:.2f} ms, {a['of_target']:.2%} of it); measured {measured:.2f} ms "
              f"({measured / table.dense_measured_ms:.2%} of the dense {table.dense_measured_ms:.2f} ms measured)")
    elif budget.aligned:
        print(f"aligned widths: {sel.achieved['size']:,.0f} {budget.metric} = {sel.achieved['of_target']:.2%} of the "
              f"target {sel.achieved['target']:,.0f}")
    print(_table(rows))
    print(f"max |masked - compressed| / max |masked| = {err:.2e}")
    print(f"load {t_load:.1f}s, select + compress {t_compress:.1f}s")
    if budget.uniform:
        print(f"saved: {out_dir}  (stock {small.config.model_type}: from_pretrained(dir) loads it, with or without "
              f"vtrans)")
    else:
        print(f"saved: {out_dir}  (load with vtrans.checkpoint.load_pretrained(dir), or from_pretrained(dir) after "
              f"`import vtrans`)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    import vtrans
    from vtrans.checkpoint import (
        VTRANS_MODEL_TYPES,
        check_output_dir,
        is_vtrans_checkpoint,
        load_pretrained,
        load_tokenizer,
        meta_model,
        read_config,
        write_atomically,
    )
    from vtrans.errors import KIND_WORDS, path_kind, quote
    from vtrans.export import FORMATS, stock_shape, to_stock

    # every argument is checked before anything is loaded; nothing is written unless the export is exact
    if args.format not in FORMATS:
        raise vtrans.ConfigError(f"--format must be one of {list(FORMATS)}, got {quote(args.format)}")
    kind = path_kind("DIR", args.dir)
    if kind != "dir":
        what = "does not exist" if kind is None else f"is {KIND_WORDS[kind]}"
        raise vtrans.ConfigError(f"DIR={quote(args.dir)} {what}; give a checkpoint directory written by vtrans "
                                 f"compress or a pipeline run")
    if not is_vtrans_checkpoint(args.dir):
        raise vtrans.ConfigError(f"DIR={quote(args.dir)} is not a vtrans checkpoint (it lacks compression.json or "
                                 f"modeling_vtrans.py); export takes a directory written by vtrans compress or a "
                                 f"pipeline run (a --uniform one is stock already)")
    check_output_dir(args.out, args.overwrite, sources=[args.dir])
    config = read_config(args.dir)
    if config.model_type not in VTRANS_MODEL_TYPES:
        raise vtrans.ConfigError(f"DIR={quote(args.dir)} has model_type={config.model_type!r}, not a vtrans one "
                                 f"({sorted(VTRANS_MODEL_TYPES)}); it needs no export")
    stock_shape(meta_model(args.dir))  # what cannot be exported fails before the weights load
    model = load_pretrained(args.dir, dtype=torch.float32).eval()
    stock = to_stock(model).eval()  # ExportError (one line) where the stock architecture cannot express it exactly
    tokenizer = load_tokenizer(args.dir)
    if tokenizer is not None:
        stock.vtrans_tokenizer = tokenizer

    # the stock model must compute what the checkpoint computes (a padded hidden size adds zero dimensions)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(input_ids=ids), stock(input_ids=ids)
    key = "logits" if hasattr(ref, "logits") else "last_hidden_state"
    a, b = getattr(ref, key), getattr(out, key)
    b = b[..., : a.shape[-1]]
    err = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-12)
    saved = getattr(config, "dtype", None)
    if isinstance(saved, torch.dtype):
        stock.to(dtype=saved)
    _made_by(stock, ["vtrans", "export", args.dir, "--format", args.format, "--out", args.out])
    out_dir = write_atomically(args.out, stock.save_pretrained, overwrite=args.overwrite, sources=[args.dir])
    info = stock.vtrans_report["stock"]
    c = vtrans.count(stock)
    print(f"exported: {args.dir} -> {out_dir}  (stock {info['model_type']}, {type(stock).__name__})")
    print(f"layers {len(info['layers'])}, hidden {info['hidden_size']}, kv heads {info['kv_heads']}, ffn "
          f"{info['intermediate_size']}{' (zero-padded to common widths)' if info['padded'] else ''}; params "
          f"{c.params_total:,} (vtrans checkpoint {vtrans.count(model).params_total:,})")
    print(f"max |vtrans - stock| / max |vtrans| = {err:.2e}")
    print("loads with AutoModel*.from_pretrained(dir), with or without vtrans")
    return 0


def _load_config(args: argparse.Namespace):
    from pipelines.config import load_config

    return load_config(args.config, args.overrides)  # a malformed override is a one-line ConfigError there


def _is_sweep(path: str) -> bool:
    from pipelines.config import read_yaml

    return "sweep" in read_yaml(path)


def cmd_validate(args: argparse.Namespace) -> int:
    if _is_sweep(args.config):
        return _validate_sweep(args)
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


def _validate_sweep(args: argparse.Namespace) -> int:
    """A sweep config checked as ``vtrans sweep`` checks it before Ray starts; nothing runs."""
    from pipelines.sweep import check_sweep, load_sweep
    from pipelines.tracking import check_server
    from pipelines.validate import finished, plan

    sweep = load_sweep(args.config, args.overrides)
    checked = check_sweep(sweep)
    base = sweep.model_configs[next(iter(sweep.models))]
    uri = base.tracking.resolved_uri()
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    if args.quiet:
        return 0
    c = sweep.config
    grid = sweep.grid_points()
    per_model = len(grid) * c.num_samples if c.search == "grid" else c.num_samples
    print(f"sweep {sweep.name}: search {c.search}, {len(sweep.models)} model(s) x {per_model} trial(s) = "
          f"{len(sweep.models) * per_model} trials" + (", early stopping: asha" if c.early_stopping else "")
          + (", one mask training per posterior (reuse_posterior)" if c.reuse_posterior else ""))
    print("space: " + ", ".join(f"{k}={v}" for k, v in c.space.items()))
    rows = [["model", "model.name", "calibrate", "teacher", "trials finished"]]
    for label, cfg in sweep.model_configs.items():
        done = finished(cfg, checked[label].keys)
        shared = ["cached" if done[n] else "to run" for n in ("calibrate", "teacher")]
        if c.search == "grid":
            points = [sweep.point_config(label, point) for point in grid]
            n_done = sum(finished(p, plan(p))["evaluate"] for p in points)
            trials = f"{n_done}/{len(points)}" + (f" (x{c.num_samples})" if c.num_samples > 1 else "")
        else:
            trials = f"- ({c.num_samples} drawn at run time)"
        rows.append([label, cfg.model.name, *shared, trials])
    print(_table(rows))
    print(f"{args.config}: valid ({'every grid point' if c.search == 'grid' else 'the bounds of every dimension'} "
          f"checked for every model; nothing was run)")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    shipped = shipped_configs()
    width = max((len(n) for n in shipped), default=0)
    for name, path in shipped.items():
        print(f"{name.ljust(width)}  {config_description(path)}")
    print("\nuse a name in place of a path: vtrans run NAME, vtrans validate NAME, vtrans sweep NAME "
          f"(files under {next(iter(shipped.values())).parent if shipped else '?'})")
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
        from vtrans.metrics import HIGHER_IS_BETTER

        q = [k for k in HIGHER_IS_BETTER if k in m]
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
    from pipelines.dag import run_pipeline
    from pipelines.stages.products import Evaluation

    cfg = _load_config(args)
    if args.console is not None:
        run_dir = Path(cfg.output).expanduser().resolve() / cfg.name  # made by the run once its checks passed
        args.console.log_to(run_dir / "vtrans.log", run_dir)
    run = run_pipeline(cfg, force=args.force, from_stage=args.from_stage)
    rows = [["stage", "status", "key", "wall", "result"]]
    for name, r in run.results.items():
        rows.append([name, r.status, r.key, f"{r.wall_s:.0f}s", _highlights(name, r)])
    print()
    print(_table(rows))
    report = Evaluation.of(run.results["evaluate"]).report_md
    if Path(report).is_file():
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
    if args.console is not None:
        run_dir = Path(sweep.model_configs[next(iter(sweep.models))].output).expanduser().resolve() / sweep.name
        args.console.log_to(run_dir / "vtrans.log", run_dir)
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


def _made_by(model, command: list[str]) -> None:
    """Record the command that made a checkpoint in its compression record (compression.json, the model card), after
    the commands that made the checkpoint it came from (``export`` of a ``compress`` output)."""
    import shlex

    report = getattr(model, "vtrans_report", None)
    if report is None:
        report = model.config.vtrans.setdefault("report", {})
    report["command"] = "\n".join(filter(None, [report.get("command"), shlex.join(command)]))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vtrans`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers = {"run": cmd_run, "sweep": cmd_sweep, "validate": cmd_validate, "configs": cmd_configs,
                "inspect": cmd_inspect, "compress": cmd_compress, "relog": cmd_relog, "export": cmd_export}
    args.console = None
    from safetensors import SafetensorError

    from vtrans.errors import VtransError

    try:
        if getattr(args, "config", None) is not None:
            args.config = resolve_config(args.config)
        if args.command in ("run", "sweep"):
            from contextlib import ExitStack

            from pipelines.console import QuietConsole, verbose_requested

            with ExitStack() as stack:
                args.console = stack.enter_context(QuietConsole(verbose_requested(args.verbose)))
                return handlers[args.command](args)
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

