"""The benchmark harness: the pure parts (seed statistics, ratios, budget checks, the markdown and its claims, the
profiles and their bad-input errors) as unit tests, and one end-to-end run of the ``smoke`` profile on tiny models
(real Rotten Tomatoes and Wikipedia text, real MLflow store, real local Ray for the overhead comparison)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import vtrans
from pipelines import bench
from pipelines.bench import mlflow_runs, report, stats
from pipelines.bench.stats import (
    Stat,
    aggregate,
    budget_met,
    flops_reduction,
    mean_std,
    speedup,
    speedup_per_flops,
    time_ratios,
)
from pipelines.config import config_hash, to_dict
from vtrans.errors import ConfigError
from vtrans.train import PruneConfig

# ---------------------------------------------------------------------------------------------------------------------
# statistics and ratios
# ---------------------------------------------------------------------------------------------------------------------


def test_mean_std_is_the_sample_std():
    s = mean_std([0.70, 0.72, 0.74])
    assert s.mean == pytest.approx(0.72)
    assert s.std == pytest.approx(0.02)  # ddof=1: sqrt((0.02^2 + 0 + 0.02^2) / 2)
    assert s.n == 3
    assert s.fmt() == "0.7200 ± 0.0200 (n=3)"


def test_mean_std_single_seed_and_infinite_values():
    assert mean_std([0.5]) == Stat(0.5, None, 1)
    assert mean_std([0.5]).fmt() == "0.5000 (n=1)"
    assert mean_std([12.0, math.inf]) == Stat(math.inf, None, 2)  # a diverged perplexity ranks as the worst
    assert mean_std([31772.4]).fmt() == "31,772 (n=1)"


@pytest.mark.parametrize("values", [[], [1.0, float("nan")]])
def test_mean_std_refuses_empty_and_nan(values):
    with pytest.raises(ConfigError):
        mean_std(values)


def _row(method, budget, seed, ft, q, **kw):
    return {"task": "t", "method": method, "budget": budget, "seed": seed, "finetuned": ft, "quality": q, **kw}


def test_aggregate_groups_seeds():
    rows = [_row("random", 0.5, 0, False, 0.6), _row("random", 0.5, 1, False, 0.8), _row("random", 0.5, 0, True, 0.7),
            _row("vtrans", 0.5, 0, False, 0.75)]
    stats = aggregate(rows)
    assert list(stats) == [("t", "random", 0.5, False), ("t", "random", 0.5, True), ("t", "vtrans", 0.5, False)]
    assert stats[("t", "random", 0.5, False)].mean == pytest.approx(0.7)
    assert stats[("t", "random", 0.5, False)].std == pytest.approx(math.sqrt(0.02))
    assert stats[("t", "vtrans", 0.5, False)].std is None
    with pytest.raises(ConfigError, match="row 0 has no"):
        aggregate([{"task": "t", "method": "random"}])


def test_ratios():
    assert speedup(30.0, 15.0) == 2.0
    assert flops_reduction(2_868_903_936, 1_434_451_968) == 2.0
    assert speedup_per_flops(1.6, 2.0) == pytest.approx(0.8)
    for bad in (0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ConfigError, match="must be a finite number > 0"):
            speedup(10.0, bad)


def test_budget_met_is_exact():
    # target 500 of 1000, tolerance 0.5%: [497.5, 500]
    assert budget_met(500, 1000, 0.5, 0.005)
    assert budget_met(498, 1000, 0.5, 0.005)
    assert not budget_met(501, 1000, 0.5, 0.005)
    assert not budget_met(497, 1000, 0.5, 0.005)


def test_time_ratio_counts_a_shared_posterior_once_per_seed():
    task = {"rows": [
        _row("vtrans", 0.5, 0, False, 0.7, compress_s=100.0, compress_group="posterior@0.3", prune_steps=200),
        _row("vtrans", 0.3, 0, False, 0.6, compress_s=100.0, compress_group="posterior@0.3", prune_steps=200),
        _row("faster", 0.5, 0, False, 0.7, compress_s=4.0, compress_group="posterior@0.3", prune_steps=100),
        _row("faster", 0.5, 1, False, 0.7, compress_s=6.0, compress_group="posterior@0.3", prune_steps=100)]}
    r = time_ratios(task)
    assert r["faster_over_vtrans"] == pytest.approx(5.0 / 100.0)
    assert r["faster_over_vtrans_per_step"] == pytest.approx((5.0 / 100) / (100.0 / 200))
    assert time_ratios({"rows": task["rows"][:2]}) == {}


# ---------------------------------------------------------------------------------------------------------------------
# the markdown report
# ---------------------------------------------------------------------------------------------------------------------

DENSE = {"quality": 0.81, "params_blocks": 1000, "params_total": 3000, "flops_blocks": 2000, "flops_total": 2100,
         "seq_len": 128}


def _task_rows() -> list[dict]:
    rows = []
    quality = {("random", 0.5): [0.60, 0.64], ("random", 0.3): [0.55, 0.57], ("vtrans", 0.5): [0.805],
               ("vtrans", 0.3): [0.70], ("faster", 0.5): [0.79], ("faster", 0.3): [0.66]}
    for (m, b), qs in quality.items():
        for seed, q in enumerate(qs):
            size = {"params_blocks": int(b * 1000) - 1, "params_total": int(b * 1000) + 1999,
                    "flops_blocks": int(b * 2000), "flops_total": int(b * 2000) + 100}
            timed = {"compress_s": 200.0 if m == "vtrans" else 10.0 if m == "faster" else 0.5,
                     "compress_group": "posterior@0.3" if m != "random" else None,
                     "prune_steps": {"vtrans": 200, "faster": 100}.get(m)}
            rows.append(_row(m, b, seed, False, q, budget_met=True, **size, **timed))
            rows.append(_row(m, b, seed, True, q + 0.1 if m == "random" else q + 0.005, budget_met=True,
                             finetune_s=30.0, **size, **timed))
    return rows


def _results() -> dict:
    timings = {"1": {"median_ms": 16.0, "throughput": 62.5, "speedup": 2.0, "speedup_per_flops": 0.95},
               "32": {"median_ms": 500.0, "throughput": 64.0, "speedup": 1.9, "speedup_per_flops": 0.9}}
    task = {"label": "t", "model_name": "MiniLM", "data_name": "RT", "metric": "accuracy", "dense": DENSE,
            "tolerance": 0.005, "rows": _task_rows(),
            "latency": {"device": "cpu", "threads": 1, "seq_len": 128, "repeats": 5, "warmup": 1,
                        "batch_sizes": [1, 32], "dense": {"1": {"median_ms": 32.0}, "32": {"median_ms": 950.0}},
                        "dense_end": {"1": {"median_ms": 33.0}, "32": {"median_ms": 990.0}},
                        "dense_ops": {"matmul": 24.0, "attention": 4.0, "norm": 1.0, "other": 3.0, "total": 32.0},
                        "ops_batch_size": 1,
                        "models": [{"method": "vtrans", "budget": 0.5, "flops_reduction": 2.1, "timings": timings,
                                    "ops": {"matmul": 10.0, "attention": 3.0, "norm": 1.0, "other": 2.0,
                                            "total": 16.0}}]},
            "stages": {"teacher": {"peak_rss_mb": 900.0, "delta_mb": 300.0, "runs": 1}}}
    overhead = {"description": "tiny", "ray_init_s": 5.0, "ratio": 3.0, "extra_s": 60.0, "stages": ["prune"],
                "local": {"wall_s": 30.0, "stages": {"prune": {"wall_s": 10.0, "peak_rss_mb": 700.0}}},
                "dag": {"wall_s": 90.0, "stages": {"prune": {"wall_s": 30.0, "peak_rss_mb": 650.0}}}}
    return {"profile": "unit", "machine": "test box", "command": "python -m pipelines.bench --profile unit",
            "date": "2026-01-01", "device": "cpu", "executor": "local", "wall_s": 600.0,
            "mlflow": {"experiment": "benchmarks", "run_id": "abc", "uri": "sqlite:///x.db"},
            "what_ran": ["did things"], "tasks": {"t": task}, "overhead": overhead, "notes": ["a note"],
            "phases": {"t cells (6)": 480.4, "t latency": 60.0}}


def test_markdown_tables():
    md = report.render_markdown(_results())
    # quality: mean ± std over seeds, the best of each column in bold, without and with the fine-tune
    assert "| random | 0.6200 ± 0.0283 (n=2) | 0.5600 ± 0.0141 (n=2) |" in md
    assert "| vtrans | **0.8050 (n=1)** | **0.7000 (n=1)** |" in md
    assert "| random | 0.7200 ± 0.0283 (n=2) | 0.6600 ± 0.0141 (n=2) |" in md  # after the fine-tune
    assert "| vtrans | **0.8100 (n=1)** | **0.7050 (n=1)** |" in md
    # sizes against the target, exact counts
    assert "| vtrans | 0.5 | 500 | 499 | 0.4990 | 0.8330 | 0.5000 | 0.5238 | yes (1/1) |" in md
    # latency and the speedup ÷ FLOPs-reduction ratio
    assert "| vtrans | 0.5 | 2.10x | 16.0 | 62.5 | 2.00x | 0.95 | 500.0 | 64.0 | 1.90x | 0.90 |" in md
    assert "b1: 32.0 -> 33.0 ms" in md
    # where the time goes: matmul 24 -> 10 ms is 2.4x for 2.1x fewer FLOPs; the rest 8 -> 6 ms
    assert "| dense | 1 | 1.00x | 24.00 | 4.00 | 1.00 | 3.00 | 32.00 | 75% |  |  |" in md
    assert "| vtrans | 0.5 | 2.10x | 10.00 | 3.00 | 1.00 | 2.00 | 16.00 | 62% | 1.14 | 1.33x |" in md
    # compression time, the faster / vtrans ratio (one shared training per seed)
    assert "Faster-VTrans ÷ VTrans compression time: 0.050, i.e. Faster-VTrans 20.0x as fast; per optimizer step " \
           "0.100." in md
    assert "| vtrans | 200.0 (n=1) | 1 | 200 | 1.00 |  | one run for all budgets |" in md
    # overhead and memory
    assert "| prune | 30.0 | 10.0 | 3.00 | 650 | 700 |" in md
    assert "| **whole pipeline (driver wall)** | 90.0 | 30.0 | **3.00** |" in md
    assert "| teacher | 900 | 300 | 1 |" in md
    assert md.startswith("# Benchmark `unit`") and "- did things" in md and "- a note" in md
    assert "Phases: t cells (6) 480 s; t latency 60 s." in md


def test_cached_rows_are_disclosed():
    res = _results()
    assert report.cache_notes(res) == []
    res["tasks"]["t"]["rows"][0]["cached"] = True
    res["tasks"]["t"]["setup"] = {"data": {"status": "cached"}, "teacher": {"status": "ran"}}
    notes = report.cache_notes(res)
    assert notes == [f"t: 1 of {len(res['tasks']['t']['rows'])} rows, the data came from the cache of an earlier "
                     f"invocation with the same settings (their quality, sizes and compression / fine-tune times were "
                     f"measured then; latency is measured every time)."]
    assert notes[0] in report.render_markdown(res)


def test_a_cell_computed_against_another_teacher_is_not_reused(tmp_path: Path, capsys):
    """The teacher stage's key is the same for a teacher trained in one process and by two Ray Train workers (two
    dropout draws): the cell records its teacher's weights digest and is computed again against another teacher."""
    from pipelines.bench.tasks import weights_digest

    t1, t2 = tmp_path / "t1", tmp_path / "t2"
    for d, byte in ((t1, b"\x00"), (t2, b"\x01")):
        d.mkdir()
        (d / "model.safetensors").write_bytes(byte * 1000)
        (d / "config.json").write_text("{}")  # not weights: not in the digest
    assert weights_digest(t1) != weights_digest(t2)
    before = weights_digest(t2)
    (t2 / "config.json").write_text('{"x": 1}')
    assert weights_digest(t2) == before  # only the weights count
    p = bench.load_profile("quick")
    rows = [{"method": "kwon", "budget": 0.5, "finetuned": False, "quality": 0.8}]

    def spec(digest: str) -> bench.CellSpec:
        setup = bench.TaskSetup(kind="encoder", label="minilm", task="seq-cls", metric="accuracy", splits={},
                                sizes={}, pad_token_id=0, num_labels=2, teacher_dir=str(t1), keys={}, dense={},
                                teacher_digest=digest)
        return bench.CellSpec(setup=setup, profile=p.encoder, method="kwon", seed=1, finetune=False, device="cpu",
                              threads=1, models_dir=str(tmp_path), cache_file=str(tmp_path / "cell.json"))

    cell = tmp_path / "cell.json"
    cell.write_text(json.dumps({"rows": rows, "wall_s": 1.0, "teacher_digest": weights_digest(t1)}))
    assert bench.cached_rows(spec(weights_digest(t1))) == rows
    assert bench.cached_rows(spec(weights_digest(t2))) is None
    assert "was computed against another teacher" in capsys.readouterr().out
    cell.write_text(json.dumps({"rows": rows, "wall_s": 1.0}))  # cached before the digest was recorded
    assert bench.cached_rows(spec(weights_digest(t2))) == rows


def test_claims_are_checked_against_the_numbers():
    claims = "\n".join(report.check_claims(_results()["tasks"]["t"]))
    assert "dominate the baselines (without fine-tune): **confirmed**; better at 0.5, 0.3." in claims
    assert "dominate the baselines (with fine-tune): **confirmed**" in claims
    assert "vtrans loses <= 1 accuracy point at 50% (fine-tuned): **confirmed** (+0.0 points" in claims
    assert "Faster-VTrans >= 10x faster than VTrans: **confirmed** (20.0x)" in claims
    assert "0.5: +1.5 points, 0.3: +4.0 points" in claims


def test_claims_contradicted():
    task = _results()["tasks"]["t"]
    for r in task["rows"]:
        if r["method"] == "random" and r["finetuned"]:
            r["quality"] = 0.9
        if r["method"] == "faster":
            r["compress_s"] = 50.0
    claims = "\n".join(report.check_claims(task))
    assert "(with fine-tune): **contradicted**; better at no budget; not at 0.5 (beaten or tied by random)" in claims
    assert "Faster-VTrans >= 10x faster than VTrans: **contradicted** (4.0x)" in claims


def test_pareto_plot_is_a_png(tmp_path):
    path = report.plot_pareto(_results()["tasks"]["t"], tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(bench.PROFILES))
def test_every_profile_is_valid_and_round_trips(name):
    from pipelines.config import from_dict, to_dict

    p = bench.load_profile(name)
    assert from_dict(bench.Profile, to_dict(p)) == p
    for _, t in p.tasks():
        assert set(t.methods) == set(bench.METHODS) or name == "ablation"  # the ablations: Faster and Kwon only
        assert all(m in t.prune_steps for m in bench.VIB_METHODS)


def test_quick_profile_keeps_the_issue_grid():
    q = bench.load_profile("quick")
    assert q.encoder.budgets == [0.7, 0.5, 0.3, 0.2]
    assert all(q.encoder.seeds_of(m) == 3 for m in ("random", "kwon", "vtrans", "fast", "faster"))
    assert q.encoder.finetune_seeds == 3 and not q.encoder.shared_posterior  # issue 16: 3 fine-tuned seeds
    assert q.decoder.budgets == [0.8, 0.7] and q.encoder.lr_masks == PruneConfig().lr_masks
    assert q.encoder.latency.batch_sizes == [1, 32] and q.encoder.latency.seq_len == 128
    assert q.executor == "ray" and q.threads == 1 and q.cpus_per_cell == 1.0 and q.teacher_workers == 2


def test_overrides():
    p = bench.load_profile("quick", ["encoder.prune_steps.vtrans=300", "decoder=null"])
    assert p.encoder.prune_steps == {"vtrans": 300, "fast": 200, "faster": 20}
    assert p.decoder is None
    assert bench.PROFILES["quick"].encoder.prune_steps["vtrans"] != 300  # the built-in is not modified


@pytest.mark.parametrize("overrides, match", [
    (["encoder.prune_stpes.vtrans=3"], "did you mean 'encoder.prune_steps'"),
    (["encoder.budgets=[0.5, 1.5]"], r"budgets\[1\] must be a fraction in \(0, 1\), got 1.5"),
    (["encoder.budgets=[0.5, 0.5]"], "budgets lists a budget twice"),
    (["encoder.methods=[random, bogus]"], r"methods\[1\] must be one of .*'kwon'.*got 'bogus'"),
    (["encoder.finetune_seeds=2", "encoder.trained_seeds=1"],
     "finetune_seeds=2 must be <= seeds=3 and trained_seeds=1"),
    (["encoder.prune_steps.random=3"], "prune_steps has 'random'; only"),
    (["encoder.calibration_count=10"], "exactly one of calibration_fraction and calibration_count"),
    (["encoder.finetune_steps=0"], "must be both 0"),
    (["encoder.latency.batch_sizes=[1, 0]"], r"latency.batch_sizes\[1\] must be an int >= 1, got 0"),
    (["encoder.tolerance=0"], r"tolerance must be in \(0, 1\), got 0"),
    (["encoder=null", "decoder=null"], "needs at least one of encoder and decoder"),
    (["decoder.label=minilm"], "must differ"),
    (["executor=slurm"], "executor must be one of"),
    (["overhead.method=random"], "overhead.method must be one of"),
    (["encoder.kl_normalisation=layer"], r"kl_normalisation must be one of \['group', 'unit'\], got 'layer'"),
    (["encoder.constraint=projectoin"], r"constraint='projectoin': prune.constraint must be one of \['lagrangian', "),
    (["encoder.init=fishr"], r"init='fishr': prune.init must be one of \['constant', 'fisher'\], got 'fishr'"),
    (["encoder.selection=qouta"], r"selection='qouta': vib.selection must be one of"),
    (["encoder.lr_mu=-1"], r"lr_mu=-1.0: prune.lr_mu must be a number > 0, got -1.0"),
    (["encoder.finetune_method=qlora"], r"finetune_method must be one of \['full', 'lora'\], got 'qlora'"),
    (["decoder.finetune_method=lora", "decoder.lora_rank=0"], r"lora_rank must be an int >= 1, got 0"),
    (["decoder.finetune_method=lora", "decoder.lora_alpha=-1"], r"lora_alpha must be > 0, got -1"),
    (["encoder.lora_rank=4"], r"lora_rank=4 / lora_alpha=None need finetune_method='lora'"),
])
def test_bad_profile_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        bench.load_profile("quick", overrides)


def test_vib_methods_need_their_steps():
    import dataclasses

    with pytest.raises(ConfigError, match=r"prune_steps needs the steps of \['fast', 'faster'\]"):
        dataclasses.replace(bench.load_profile("quick").encoder, prune_steps={"vtrans": 3})


def test_unknown_profile_and_device():
    with pytest.raises(ConfigError, match="profile must be one of .* got 'quik'; did you mean 'quick'"):
        bench.load_profile("quik")
    with pytest.raises(ConfigError, match="--device must be one of"):
        bench.resolve_device("tpu")
    assert bench.resolve_device("cpu") == "cpu"


def test_cli_bad_input_is_one_line_exit_2(capsys):
    assert bench.main(["--profile", "smoke", "encoder.seeds=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "encoder: seeds must be an int >= 1, got 0" in err and "Traceback" not in err
    # options before, between and after the overrides (the override after --out still reaches the profile)
    assert bench.main(["encoder.seeds=1", "--profile", "smoke", "--out", "x", "encoder.seeds=0"]) == 2
    assert "encoder: seeds must be an int >= 1, got 0" in capsys.readouterr().err


def test_cell_key_depends_on_what_changes_the_rows():
    p = bench.load_profile("quick")
    setup = bench.TaskSetup(kind="encoder", label="minilm", task="seq-cls", metric="accuracy", splits={}, sizes={},
                            pad_token_id=0, num_labels=2, teacher_dir="t", keys={"calibrate": "a", "teacher": "b"},
                            dense={})
    key = bench.cell_key(setup, p.encoder, "vtrans", 0, True, "cpu")
    assert key == bench.cell_key(setup, bench.load_profile("quick", ["encoder.latency.repeats=9",
                                                                     "encoder.seeds=5"]).encoder,
                                 "vtrans", 0, True, "cpu")
    assert key != bench.cell_key(setup, p.encoder, "vtrans", 1, True, "cpu")
    assert key != bench.cell_key(setup, bench.load_profile("quick", ["encoder.prune_steps.vtrans=7"]).encoder,
                                 "vtrans", 0, True, "cpu")
    # another method's steps leave a cell valid (a shorter Faster-VTrans does not retrain VTrans)
    assert key == bench.cell_key(setup, bench.load_profile("quick", ["encoder.prune_steps.faster=7"]).encoder,
                                 "vtrans", 0, True, "cpu")
    assert bench.cell_key(setup, p.encoder, "faster", 0, True, "cpu") != bench.cell_key(
        setup, bench.load_profile("quick", ["encoder.prune_steps.faster=7"]).encoder, "faster", 0, True, "cpu")
    # a baseline does not depend on the VIB settings
    assert key != bench.cell_key(setup, bench.load_profile("quick", ["encoder.kl_normalisation=group"]).encoder,
                                 "vtrans", 0, True, "cpu")
    lora = bench.load_profile("quick", ["encoder.finetune_method=lora"]).encoder
    assert key != bench.cell_key(setup, lora, "vtrans", 0, True, "cpu")
    assert bench.cell_key(setup, lora, "vtrans", 0, True, "cpu") != bench.cell_key(
        setup, bench.load_profile("quick", ["encoder.finetune_method=lora", "encoder.lora_rank=4"]).encoder,
        "vtrans", 0, True, "cpu")
    random_key = bench.cell_key(setup, p.encoder, "random", 0, True, "cpu")
    for change in ("encoder.lr_masks=0.5", "encoder.kl_normalisation=group", "encoder.kl_multipliers={heads: 2}"):
        assert random_key == bench.cell_key(setup, bench.load_profile("quick", [change]).encoder,
                                            "random", 0, True, "cpu")
    # a setting added after cells were cached, left at None, leaves the keys of those cells as they were
    legacy = bench.load_profile("quick", ["encoder.kl_normalisation=null"]).encoder
    settings = {k: v for k, v in to_dict(legacy).items()
                if k not in ("label", "methods", "seeds", "trained_seeds", "finetune_seeds", "latency",
                             *bench.OPTIONAL_SETTINGS)}
    settings["flops_seq_len"] = legacy.latency.seq_len
    settings["prune_steps"] = legacy.prune_steps["vtrans"]
    assert bench.cell_key(setup, legacy, "vtrans", 0, True, "cpu") == config_hash(
        {"settings": settings, "method": "vtrans", "seed": 0, "finetune": True, "data": setup.keys, "device": "cpu",
         "version": bench.CELL_VERSION})


def test_a_cell_bigger_than_the_local_ray_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    full = bench.load_profile("full")  # 4 CPUs per cell
    with pytest.raises(ConfigError, match=r"cpus_per_cell=4 is more than the 2 CPUs of the local Ray .* set "
                                          r"cpus_per_cell=2 or lower"):
        bench.check_local_resources(full, cpus=2)
    bench.check_local_resources(full, cpus=4)
    bench.check_local_resources(bench.load_profile("full", ["executor=local"]), cpus=2)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster may autoscale: not checked
    bench.check_local_resources(full, cpus=2)
    monkeypatch.delenv("RAY_ADDRESS")
    cpus = len(__import__("os").sched_getaffinity(0))
    big = bench.load_profile("smoke", [f"cpus_per_cell={cpus + 1}"])
    with pytest.raises(ConfigError, match="no cell could ever start"):
        bench.run_bench(big, tmp_path / "out", "cpu", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()  # before any work


def test_uniform_profile_budgets_are_uniform_and_refuse_kwon():
    from pipelines.bench.cells import _budget

    p = bench.load_profile("ablation", ["encoder.uniform=true", "encoder.methods=[faster]"])
    assert _budget(p.encoder, 0.5) == vtrans.Budget(params=0.5, tolerance=p.encoder.tolerance, uniform=True)
    assert _budget(bench.load_profile("ablation").encoder, 0.5).uniform is False
    with pytest.raises(ConfigError, match="uniform=true: Kwon's search selects per-layer widths"):
        bench.load_profile("ablation", ["encoder.uniform=true"])  # its methods include kwon


def test_second_text_tables_only_where_the_rows_have_it():
    rows = [{"task": "lm", "method": m, "budget": 0.7, "seed": s, "finetuned": ft, "quality": 20.0 + s,
             "quality_second": 40.0 + 2 * s} for m in ("kwon", "faster") for s in (0, 1) for ft in (False, True)]
    task = {"label": "lm", "metric": "perplexity", "rows": rows, "second_name": "Lee news stories",
            "dense": {"quality": 18.0, "quality_second": 30.0}}
    text = "\n".join(report.quality_tables(task, "quality_second"))
    assert text.count("on Lee news stories") == 2 and "dense teacher: 30.0000" in text
    assert "41.0000 ± 1.4142 (n=2)" in text  # mean and std of 40 and 42
    assert report.quality_tables({**task, "rows": [{k: v for k, v in r.items() if k != "quality_second"}
                                                   for r in rows]}, "quality_second") == []
    with pytest.raises(ConfigError, match="second_text must be one of"):
        bench.load_profile("quick", ["decoder.second_text=rotten_tomatoes"])


def test_lm_eval_scores_get_their_own_tables_and_metrics_and_bad_tasks_name_the_key(monkeypatch):
    rows = [{"task": "lm", "method": m, "budget": 0.8, "seed": 0, "finetuned": ft, "quality": 20.0,
             "lm_eval_lambada_local_acc": acc + 0.1 * ft, "lm_eval_lambada_local_perplexity": 30.0 - ft,
             "lm_eval_lambada_local_samples": 100.0} for m, acc in (("kwon", 0.2), ("faster", 0.3)) for ft in (0, 1)]
    task = {"label": "lm", "metric": "perplexity", "rows": rows,
            "dense": {"quality": 18.0, "lm_eval_lambada_local_acc": 0.35, "lm_eval_lambada_local_perplexity": 25.0}}
    assert report.lm_eval_keys(task) == ["lm_eval_lambada_local_acc", "lm_eval_lambada_local_perplexity"]
    acc = "\n".join(report.quality_tables(task, "lm_eval_lambada_local_acc"))
    assert "lm_eval_lambada_local_acc without fine-tune (dense teacher: 0.3500; higher is better" in acc
    assert "| faster | **0.3000 (n=1)** |" in acc  # the best accuracy in bold: higher is better
    ppl = "\n".join(report.quality_tables(task, "lm_eval_lambada_local_perplexity"))
    assert "lower is better" in ppl and "dense teacher: 25.0000" in ppl

    class Tracker:
        logged: dict = {}

        def start_run(self, *a, **k):
            return "r"

        def log_metrics(self, run_id, m):
            Tracker.logged = m

        def end_run(self, run_id):
            pass

    row = {**rows[1], "budget_met": True, **{k: 1 for k in stats.SIZE_KEYS}}
    mlflow_runs.log_row(Tracker(), "p", row, "perplexity", {k: 2 for k in stats.SIZE_KEYS})
    assert Tracker.logged["lm_eval_lambada_local_acc"] == pytest.approx(0.3)
    assert Tracker.logged["lm_eval_lambada_local_samples"] == 100.0

    import vtrans.lm_eval
    from pipelines.bench.cells import lm_eval_scores

    calls = []
    monkeypatch.setattr(vtrans.lm_eval, "evaluate", lambda model, tok, tasks, limit, batch_size:
                        calls.append((model, tok, tasks, limit, batch_size)) or {"lambada_local": {"acc": 0.5}})
    d = bench.load_profile("decoder")
    assert lm_eval_scores(d.decoder, "m", "t") == {"lm_eval_lambada_local_acc": 0.5}
    assert calls == [("m", "t", ["lambada_local"], 100, d.decoder.eval_batch)]
    assert lm_eval_scores(bench.load_profile("quick").decoder, "m", "t") == {} and len(calls) == 1
    assert d.encoder is None and d.decoder.lm_eval_tasks == ["lambada_local"] and d.decoder.budgets == [0.9, 0.8, 0.7]
    assert d.decoder.finetune_method == "lora"
    full = bench.load_profile("decoder", ["decoder.finetune_method=full", "decoder.finetune_lr=5e-5",
                                          "decoder.lora_rank=null", "decoder.lora_alpha=null"])  # as documented
    assert full.decoder.finetune_method == "full" and full.decoder.lora_rank is None
    with pytest.raises(ConfigError, match=r"lm_eval_tasks\[0\]='lambada_locl' is not one of .*did you mean"):
        bench.load_profile("decoder", ["decoder.lm_eval_tasks=[lambada_locl]"])
    with pytest.raises(ConfigError, match=r"encoder.lm_eval_tasks=\['lambada_local'\]: lm-eval tasks score decoders"):
        bench.load_profile("quick", ["encoder.lm_eval_tasks=[lambada_local]"])
    with pytest.raises(ConfigError, match=r"lm_eval_limit=5 needs lm_eval_tasks"):
        bench.load_profile("quick", ["decoder.lm_eval_limit=5"])


def test_readme_section_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    start, end = report.readme_markers("unit")
    readme.write_text(f"# Project\n\nintro\n\n{start}\nold numbers\n{end}\n\n## After\nkept\n")
    res = _results()
    report.update_readme(readme, res)
    text = readme.read_text()
    assert text.startswith("# Project\n\nintro\n\n") and text.endswith(f"{end}\n\n## After\nkept\n")
    assert "old numbers" not in text
    section = text.split(start)[1].split(end)[0]
    assert section.startswith("\n### Benchmark `unit`\n")  # headings two levels down
    assert "Command: `python -m pipelines.bench --profile unit`. Date: 2026-01-01." in section
    assert "| vtrans | **0.8100 (n=1)** | **0.7050 (n=1)** |" in section and "#### Ray overhead" in section
    report.update_readme(readme, res)  # idempotent
    assert readme.read_text() == text
    readme.write_text(f"{start}\nno end\n")
    with pytest.raises(ValueError, match="needs exactly one"):
        report.update_readme(readme, res)
    assert readme.read_text() == f"{start}\nno end\n"


def test_the_shipped_benchmark_report_has_the_published_profiles_markers():
    root = Path(__file__).resolve().parents[2]
    shipped = (root / bench.BENCHMARKS_REPORT).read_text()
    readme = (root / "README.md").read_text()
    for profile in ("quick", "full"):
        assert report.has_readme_markers(shipped, profile)
        assert not any(marker in readme for marker in report.readme_markers(profile))  # moved, not copied


def test_which_readme_a_run_updates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.resolve_readme("auto", "quick", [], "benchmarks") is None  # no report here
    start, end = report.readme_markers("quick")
    Path("README.md").write_text(f"{start}\n{end}\n")
    assert bench.resolve_readme("auto", "quick", [], "benchmarks") is None  # auto is the report, not the README
    Path("pipelines").mkdir()
    Path("pipelines/BENCHMARKS.md").write_text(f"{start}\n{end}\n")
    assert bench.resolve_readme("auto", "quick", [], "benchmarks") == tmp_path / "pipelines" / "BENCHMARKS.md"
    assert bench.resolve_readme("auto", "full", [], "benchmarks") is None  # no section of full
    assert bench.resolve_readme("auto", "quick", ["encoder.lr_masks=0.1"], "benchmarks") is None  # a variation
    assert bench.resolve_readme("auto", "quick", [], "diagnostics") is None
    assert bench.resolve_readme("auto", "smoke", [], "benchmarks") is None
    assert bench.resolve_readme("none", "quick", [], "benchmarks") is None
    assert bench.resolve_readme("README.md", "quick", ["x=1"], "other") == tmp_path / "README.md"
    with pytest.raises(ConfigError, match="--readme must be an existing file, 'auto' or 'none', got 'NOPE.md'"):
        bench.resolve_readme("NOPE.md", "quick", [], "benchmarks")
    with pytest.raises(ConfigError, match="has no <!-- bench:smoke:start --> ... <!-- bench:smoke:end --> section"):
        bench.resolve_readme("README.md", "smoke", [], "benchmarks")
    assert bench.main(["--profile", "smoke", "--readme", "NOPE.md"]) == 2  # before any work
    with pytest.raises(ConfigError, match="has no results.json: run the benchmark into it first"):
        bench.render_only(tmp_path / "empty")


def test_load_watch_samples_the_load_average():
    import time

    with bench.LoadWatch(interval=0.01) as lw:
        time.sleep(0.05)
    d = lw.as_dict()
    assert len(lw.samples) >= 3
    assert d["max"] >= d["mean"] >= 0 and d["cpus"] >= 1


def test_peak_rss_sees_an_allocation():
    import torch

    with bench.PeakRSS(interval=0.01) as rss:
        x = torch.ones(64 * 2**20 // 4 * 4)  # 256 MB, touched
        x += 1
        del x
    assert rss.delta_mb > 200
    assert rss.peak_mb >= rss.start_mb + rss.delta_mb - 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------------


def _tiny_models(d: Path) -> tuple[Path, Path]:
    """A tiny BERT classifier and a tiny Llama LM with MiniLM's real tokenizer (wide enough for 0.5% budgets)."""
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    from tests.tiny import tiny
    from vtrans.assets import resolve_model
    from vtrans.checkpoint import load_tokenizer

    tok = load_tokenizer(resolve_model("minilm"))
    common = {"vocab_size": tok.vocab_size, "hidden_size": 64, "intermediate_size": 256,
              "max_position_embeddings": 128}
    bert = tiny("bert", BertForSequenceClassification, num_labels=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, **common)
    llama = tiny("llama", LlamaForCausalLM, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                 eos_token_id=tok.sep_token_id, **common)
    for name, model in (("tinybert", bert), ("tinyllama", llama)):
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d / "tinybert", d / "tinyllama"


@pytest.mark.integration
def test_smoke_profile_end_to_end(tmp_path):
    import torch
    from mlflow import MlflowClient

    import vtrans
    from vtrans.checkpoint import load_pretrained

    bert, llama = _tiny_models(tmp_path)
    overrides = [f"encoder.model={bert}", f"decoder.model={llama}", f"overhead.model={bert}", "threads=1"]
    profile = bench.load_profile("smoke", overrides)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "bench"
    readme = tmp_path / "README.md"
    start, end = report.readme_markers("smoke")
    readme.write_text(f"# x\n{start}\n{end}\n")
    res = bench.run_bench(profile, out, "cpu", uri, command="pytest", overrides=overrides, readme=readme)
    assert readme.read_text() == f"# x\n{start}\n{report.readme_section(res)}{end}\n"

    # every row: method x budget x seed, pruned (a deterministic method once) and fine-tuned (seeds < finetune_seeds)
    for kind, t in profile.tasks():
        task = res["tasks"][t.label]
        got = sorted((r["method"], r["budget"], r["seed"], r["finetuned"]) for r in task["rows"])
        want = sorted((m, b, s, ft) for m in t.methods for b in t.budgets for s in range(t.seeds_of(m))
                      for ft in (False, True) if (ft and s < t.finetune_seeds)
                      or (not ft and (m not in bench.DETERMINISTIC or s == 0)))
        assert got == want
        dense = task["dense"]
        for r in task["rows"]:
            target = r["budget"] * dense["params_blocks"]
            assert (1 - t.tolerance) * target <= r["params_blocks"] <= target, r
            assert r["budget_met"] is True
            q = r["quality"]
            assert (0.0 <= q <= 1.0) if task["metric"] == "accuracy" else (1.0 < q < math.inf)
        # the saved models are what the rows counted: exact parameters of the checkpoint on disk
        for r in task["rows"]:
            if r["seed"] == 0 and not r["finetuned"]:
                small = load_pretrained(r["model_dir"], task="seq-cls" if kind == "encoder" else "causal-lm",
                                        dtype=torch.float32)
                assert vtrans.count(small, seq_len=t.latency.seq_len).params_blocks == r["params_blocks"]
        # latency: every (method, budget), speedups recomputable from the medians
        lat = task["latency"]
        assert {(e["method"], e["budget"]) for e in lat["models"]} == {(m, b) for m in t.methods for b in t.budgets}
        for e in lat["models"]:
            assert e["flops_reduction"] == pytest.approx(lat["dense_flops_total"] / e["flops_total"])
            for b in t.latency.batch_sizes:
                tm = e["timings"][str(b)]
                assert tm["speedup"] == pytest.approx(lat["dense"][str(b)]["median_ms"] / tm["median_ms"])
                assert tm["speedup_per_flops"] == pytest.approx(tm["speedup"] / e["flops_reduction"])
            assert e["ops"]["matmul"] > 0 and e["ops"]["total"] == pytest.approx(sum(
                v for k, v in e["ops"].items() if k != "total"))
        if t.second_text is not None:  # the decoder's second text: scored on every row, never trained on
            assert all(1.0 < r["quality_second"] < math.inf for r in task["rows"])
            assert 1.0 < task["dense"]["quality_second"] < math.inf and task["second_name"] == "Lee news stories"
        else:
            assert not any("quality_second" in r for r in task["rows"])
        # lm-eval scores only where a profile asks (the decoder profile; unit-tested: an lm-eval run in every cell's
        # process costs minutes of CI, and test_pipeline / test_lm_eval run lm-eval for real)
        assert not any(k.startswith("lm_eval_") for r in task["rows"] for k in r)
        assert {"data", "teacher", "evaluate", "finetune", "latency"} <= set(task["stages"])
        assert time_ratios(task)["faster_over_vtrans"] > 0

    ov = res["overhead"]
    assert set(ov["dag"]["stages"]) == set(ov["local"]["stages"]) == {"calibrate", "teacher", "prune", "finetune",
                                                                      "evaluate"}
    assert ov["ratio"] == pytest.approx(ov["dag"]["wall_s"] / ov["local"]["wall_s"])

    # files
    md = (out / "results.md").read_text()
    assert "## minilm" in md and "## smollm2" in md and "## Ray overhead" in md and "### The expected shape" in md
    assert md.count("on Lee news stories (never seen in pruning or fine-tuning)") == 2
    for label in ("minilm", "smollm2"):
        assert (out / f"pareto-{label}.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["mlflow"]["run_id"] == res["mlflow"]["run_id"]
    # the report re-rendered from results.json alone is the run's, byte for byte (README section included)
    (out / "results.md").unlink()
    readme_text = readme.read_text()
    bench.render_only(out, str(readme))
    assert (out / "results.md").read_text() == md and readme.read_text() == readme_text

    # MLflow, queried back: the parent, a child run per row with its numbers, the overhead pipeline nested under it
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("benchmarks")
    parent = client.get_run(res["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.experiment_id == exp.experiment_id
    assert parent.data.metrics["ray_overhead_ratio"] == pytest.approx(ov["ratio"])
    assert parent.data.metrics["minilm.dense.accuracy"] == pytest.approx(res["tasks"]["minilm"]["dense"]["quality"])
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=1000)
    rows = [r for task in res["tasks"].values() for r in task["rows"]]
    by_id = {c.info.run_id: c for c in children}
    assert len(children) == len(rows) + 1  # + the overhead pipeline's run
    for r in rows:
        c = by_id[r["run_id"]]
        assert c.data.metrics["quality"] == pytest.approx(r["quality"])
        assert c.data.metrics["params_blocks"] == r["params_blocks"]
        assert c.data.tags["bench.method"] == r["method"]
    assert by_id[ov["dag"]["run_id"]].data.tags["bench.role"] == "ray-overhead-dag"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "results.md", "pareto-minilm.png", "pareto-smollm2.png", "rows.json"} <= artifacts

    # one VIB training per budget (the full profile's way): its own run per budget, each budget met
    per = bench.run_bench(bench.load_profile("smoke", [*overrides, "overhead=null", "decoder=null",
                                                       "encoder.methods=[faster]", "encoder.shared_posterior=false"]),
                          tmp_path / "per-budget", "cpu", uri)
    rows = per["tasks"]["minilm"]["rows"]
    assert sorted((r["budget"], r["finetuned"]) for r in rows) == [(0.3, False), (0.3, True), (0.5, False),
                                                                    (0.5, True)]
    assert all(r["budget_met"] and r.get("compress_group") is None and r["prune_steps"] == 3 for r in rows)
    assert "one run per budget" in (tmp_path / "per-budget" / "results.md").read_text()

    # a re-run reuses the data, the teacher and every cell
    again = bench.run_bench(bench.load_profile("smoke", [*overrides, "overhead=null"]), out, "cpu", uri)
    for label, task in again["tasks"].items():
        assert task["setup"]["data"]["status"] == task["setup"]["teacher"]["status"] == "cached"
        assert all(r["cached"] for r in task["rows"])
        assert [r["quality"] for r in task["rows"]] == [r["quality"] for r in res["tasks"][label]["rows"]]


def test_what_ran_states_the_recipe_the_cells_train_with():
    """The report's recipe line says the KL normalisation the library applies when the profile leaves it unset (it
    said 'group' while the default was 'unit')."""
    from pipelines.bench.run import what_ran
    from vtrans.config import VIBConfig

    p = bench.load_profile("ablation")
    setup = bench.TaskSetup(kind="encoder", label="minilm", task="seq-cls", metric="accuracy", splits={},
                            sizes={"train": 4000, "test": 1000, "calibration": 120}, pad_token_id=0, num_labels=2,
                            teacher_dir="t", keys={}, dense={}, model_name="m", data_name="d")
    assert p.encoder.kl_normalisation is None
    line = next(x for x in what_ran(p, {"minilm": setup}) if x.startswith("**minilm**"))
    assert f"KL normalised per {VIBConfig().kl_normalisation}," in line
    explicit = bench.load_profile("ablation", ["encoder.kl_normalisation=group"])
    assert "KL normalised per group," in next(x for x in what_ran(explicit, {"minilm": setup}) if "**minilm**" in x)


def test_what_ran_names_the_fine_tune_that_ran():
    """The decoder profile's report said 'LoRA recovery' when run with the full fine-tune: the recipe line now names
    the fine-tune the cells ran, with LoRA's rank and alpha (the library's defaults where the profile leaves them)."""
    from pipelines.bench.run import what_ran
    from vtrans.lora import LoraConfig

    setup = bench.TaskSetup(kind="decoder", label="smollm2", task="causal-lm", metric="perplexity", splits={},
                            sizes={"train": 128, "test": 16, "calibration": 32}, pad_token_id=0, num_labels=None,
                            teacher_dir="t", keys={}, dense={}, model_name="m", data_name="d")

    def fine_tune(overrides: list[str]) -> str:
        lines = what_ran(bench.load_profile("decoder", overrides), {"smollm2": setup})
        line = next(x for x in lines if x.startswith("**smollm2**"))
        return line[line.index("Fine-tune"):line.index("Latency")]

    assert fine_tune([]).startswith("Fine-tune (LoRA rank 8, alpha 16, merged before measuring): 100 steps")
    full = ["decoder.finetune_method=full", "decoder.finetune_lr=5e-5", "decoder.lora_rank=null",
            "decoder.lora_alpha=null"]
    assert fine_tune(full).startswith("Fine-tune (full, every weight): 100 steps (batch 4, lr 5e-05,")
    default = fine_tune(["decoder.lora_rank=null", "decoder.lora_alpha=null"])
    assert f"LoRA rank {LoraConfig().rank}, alpha {LoraConfig().alpha:g}," in default
    assert "LoRA" not in what_ran(bench.load_profile("decoder", full), {"smollm2": setup})[0]
