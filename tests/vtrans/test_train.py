"""The pruning objective, its schedule, and training state that resumes exactly (one process; the data-parallel Ray
Train jobs are tested in tests/pipelines/test_train_jobs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM

import vtrans
from tests.tiny import tiny
from vtrans.checkpoint import CheckpointError, load_state, save_state
from vtrans.distill import DistillConfig
from vtrans.finetune import FinetuneConfig, Finetuner
from vtrans.train import PruneConfig, Pruner, fit

N = 96


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 60, (N, 10), generator=g)
    return x, (x[:, 0] > 31).long()  # learnable: the label is a function of the first token


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int = 16):
    def get(step: int) -> dict[str, torch.Tensor]:
        idx = torch.randperm(N, generator=torch.Generator().manual_seed(step))[:bs]
        return {"input_ids": x[idx], "attention_mask": torch.ones_like(x[idx]), "labels": y[idx], "sample_id": idx}
    return get


def _bert() -> BertForSequenceClassification:
    return tiny("bert", BertForSequenceClassification, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"method": "slow"}, "prune.method must be one of ['vtrans', 'fast', 'faster'], got 'slow'"),
    ({"rounds": 0}, "prune.rounds must be an integer > 0, got 0"),
    ({"steps": 2.5}, "prune.steps"),
    ({"calibration_fraction": 1.5}, "prune.calibration_fraction must be in (0, 1], got 1.5"),
    ({"calibration_fraction": 0.0}, "prune.calibration_fraction"),
    ({"budget": vtrans.Budget(params=1000)}, "prune.budget must be a fraction"),
    ({"lr_masks": -1.0}, "prune.lr_masks"),
    ({"task": "qa"}, "prune.task"),
    ({"warmup_from": "middle"}, "prune.warmup_from must be one of ['dense', 'start'], got 'middle'"),
    ({"mask_lr_decay": "cosine"}, "prune.mask_lr_decay must be one of ['none', 'linear'], got 'cosine'"),
])
def test_bad_prune_configs(kwargs, needle) -> None:
    with pytest.raises(vtrans.ConfigError) as info:
        PruneConfig(**kwargs)
    assert needle in str(info.value)


def test_bad_distill_config_is_caught_at_construction() -> None:
    with pytest.raises(vtrans.ConfigError, match="distill.temperature"):
        DistillConfig(temperature=0.0)
    with pytest.raises(vtrans.ConfigError, match="finetune.distill.hidden_weight"):
        FinetuneConfig(distill=DistillConfig(hidden_weight=1.0))


def test_schedule() -> None:
    c = PruneConfig(budget=vtrans.Budget(params=0.4), steps=10, rounds=3, finetune_steps=4, warmup=0.5)
    assert [c.round_target(r) for r in range(3)] == pytest.approx([0.8, 0.6, 0.4])
    assert c.total_steps == 3 * 10 + 2 * 4
    assert c.phase(0) == (0, "prune", 0) and c.phase(10) == (0, "finetune", 0) and c.phase(14) == (1, "prune", 0)
    assert c.phase(c.total_steps - 1) == (2, "prune", 9)
    assert c.target_at(0) == pytest.approx(1 - 0.2 / 5) and c.target_at(4) == pytest.approx(0.8)
    assert c.target_at(14) == pytest.approx(0.8 - 0.2 / 5) and c.target_at(20) == pytest.approx(0.6)
    faster = PruneConfig(method="faster", steps=10, rounds=2, finetune_steps=4)
    assert faster.total_steps == 20  # no weight fine-tuning between rounds when the weights are frozen


def test_pruning_learns_the_task_meets_the_budget_and_shrinks_kl() -> None:
    x, y = _data()
    model = _bert()
    cfg = PruneConfig(budget=vtrans.Budget(params=0.5, tolerance=0.05), steps=240, lr_weights=1e-3, lr_masks=2e-2,
                      finetune_steps=0, distill=DistillConfig(logit_weight=0.0))
    pruner = Pruner(model, cfg)
    hist = fit(pruner, _batches(x, y))
    first, last = hist[:20], hist[-20:]
    mean = lambda h, k: sum(m[k] for m in h) / len(h)  # noqa: E731
    assert mean(last, "task_loss") < 0.7 * mean(first, "task_loss")
    assert mean(last, "kl") < mean(first, "kl")
    assert abs(hist[-1]["expected_size"] - 0.5) < 0.1
    pruner.finish()
    small = vtrans.compress(pruner.vib)
    dense = vtrans.count(model).params_blocks
    assert 0.95 * 0.5 * dense <= vtrans.count(small).params_blocks <= 0.5 * dense
    assert small.config.vtrans["report"]["method"] == "vtrans"


@pytest.mark.parametrize("constraint", ["projection", "lagrangian"])
def test_faster_trains_only_masks_and_lambdas(constraint: str) -> None:
    x, y = _data()
    model = _bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = Pruner(model, PruneConfig(method="faster", budget=vtrans.Budget(params=0.6, tolerance=0.05), steps=30,
                                       constraint=constraint))
    assert "weights" not in pruner.optimizers
    mu0 = pruner.vib.hidden.mu.detach().clone()
    fit(pruner, _batches(x, y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(mu0, pruner.vib.hidden.mu.detach())
    assert (pruner.lagrangian.lambda1.item() != 0.0) == (constraint == "lagrangian")


def test_rounds_fix_each_round_budget_before_fine_tuning() -> None:
    x, y = _data()
    pruner = Pruner(_bert(), PruneConfig(budget=vtrans.Budget(params=0.5, tolerance=0.05), steps=40, rounds=2,
                                         finetune_steps=5, lr_masks=5e-2))
    seen = {}

    def on_step(step: int, metrics: dict) -> None:
        if step == 40:  # first fine-tune step: masks fixed at the first round's target (0.75)
            seen["fixed"] = bool(pruner.vib.hidden.fixed)
            seen["budget"] = pruner.vib.budget.value
        if step == 45:
            seen["released"] = not bool(pruner.vib.hidden.fixed)

    fit(pruner, _batches(x, y), on_step=on_step)
    assert seen == {"fixed": True, "budget": pytest.approx(0.75), "released": True}


def test_resume_from_a_saved_state_is_exact(tmp_path: Path) -> None:
    x, y = _data()
    cfg = PruneConfig(budget=vtrans.Budget(params=0.5, tolerance=0.05), steps=16, rounds=2, finetune_steps=4,
                      distill=DistillConfig(hidden_weight=0.5))
    full = Pruner(_bert(), cfg)
    fit(full, _batches(x, y))

    part = Pruner(_bert(), cfg)
    fit(part, _batches(x, y), end_step=18)  # stop inside the first fine-tune
    tensors, meta = part.state_tensors()
    save_state(tmp_path, tensors, dict(meta, step=17))
    resumed = Pruner(_bert(), cfg)
    tensors, meta = load_state(tmp_path)
    resumed.load_state_tensors(tensors, meta)
    fit(resumed, _batches(x, y), start_step=meta["step"] + 1)
    # equal up to float noise: a cached teacher output was computed in another batch than a fresh one
    for (name, a), (_, b) in zip(full.vib.state_dict().items(), resumed.vib.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_tied_weights_are_saved_once_and_restored_under_both_names(tmp_path: Path) -> None:
    model = tiny("llama", LlamaForCausalLM)  # tie_word_embeddings: lm_head.weight is embed_tokens.weight
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    save_state(tmp_path, {f"model.{k}": v for k, v in sd.items()}, {"step": 1})
    tensors, meta = load_state(tmp_path)
    assert meta["tensor_aliases"] == {"model.lm_head.weight": "model.model.embed_tokens.weight"}
    assert set(tensors) == {f"model.{k}" for k in sd}
    for k, v in sd.items():
        assert torch.equal(tensors[f"model.{k}"], v), k
    fresh = tiny("llama", LlamaForCausalLM, seed=1)
    fresh.load_state_dict({k[len("model."):]: v for k, v in tensors.items()})
    assert torch.equal(fresh.lm_head.weight, sd["lm_head.weight"]) and fresh.lm_head.weight is \
        fresh.model.embed_tokens.weight  # still tied


def test_corrupted_state_is_detected(tmp_path: Path) -> None:
    save_state(tmp_path, {"a": torch.arange(10.0)}, {"step": 3})
    assert load_state(tmp_path)[1]["step"] == 3
    data = (tmp_path / "state.safetensors").read_bytes()
    (tmp_path / "state.safetensors").write_bytes(data[:-8] + b"\x00" * 8)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_state(tmp_path)
    (tmp_path / "state.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_state(tmp_path)
    (tmp_path / "state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_state(tmp_path)


def test_causal_lm_pruning_and_distilled_fine_tune() -> None:
    model = tiny("llama", LlamaForCausalLM)
    x = torch.randint(3, 60, (N, 12), generator=torch.Generator().manual_seed(1))

    def batches(step: int) -> dict[str, torch.Tensor]:
        idx = torch.randperm(N, generator=torch.Generator().manual_seed(step))[:8]
        return {"input_ids": x[idx], "attention_mask": torch.ones_like(x[idx]), "labels": x[idx], "sample_id": idx}

    cfg = PruneConfig(method="faster", task="causal-lm", budget=vtrans.Budget(params=0.7, tolerance=0.05), steps=20,
                      distill=DistillConfig(cache_teacher=False))
    pruner = Pruner(model, cfg)
    hist = fit(pruner, batches)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in hist)
    pruner.finish()
    small = vtrans.compress(pruner.vib)
    teacher = tiny("llama", LlamaForCausalLM)
    ft = Finetuner(small, FinetuneConfig(task="causal-lm", steps=10, lr=1e-3), teacher=teacher)
    hist = fit(ft, batches)
    assert hist[-1]["task_loss"] < hist[0]["task_loss"]
    assert "kd_loss" in hist[0]


def test_teacher_cache_handles_batches_of_different_lengths() -> None:
    from vtrans.data import collate

    # masks with next to no noise (log-variance -9), so the student's hidden states are the teacher's at step 0
    pruner = Pruner(_bert(), PruneConfig(distill=DistillConfig(hidden_weight=1.0), init="constant",
                                         vib=vtrans.VIBConfig(logvar_init=-9.0)))
    items = [{"input_ids": torch.randint(3, 60, (n,), generator=torch.Generator().manual_seed(n)),
              "labels": torch.tensor(n % 2), "sample_id": torch.tensor(i)} for i, n in enumerate([5, 9, 7, 3])]
    pruner.begin_step(0)

    def run(batch):
        return pruner._teacher_outputs({k: batch[k] for k in ("input_ids", "attention_mask")}, batch["sample_id"],
                                       hidden=True)

    run(collate(items[:3], 0))  # cached padded to 9 tokens
    batch = collate([items[0], items[3]], 0)  # 5 tokens: sample 0 from the cache, sample 3 fresh
    mixed, cached = run(batch), run(batch)
    assert mixed["hidden"].shape == cached["hidden"].shape == (2, 3, 5, 32)
    real = batch["attention_mask"].bool()
    for j in range(2):
        assert torch.allclose(mixed["hidden"][j][:, real[j]], cached["hidden"][j][:, real[j]], atol=1e-6)
    assert torch.allclose(mixed["logits"], cached["logits"], atol=1e-6)
    loss, metrics = pruner(batch, 0)
    assert torch.isfinite(loss) and metrics["hidden_loss"] < 1e-2


# --- the recipe's knobs (issue 16) -----------------------------------------------------------------------------------


def test_mask_learning_rates_split_and_decay_linearly() -> None:
    cfg = PruneConfig(method="faster", steps=10, lr_masks=0.1, lr_mu=0.01, mask_lr_decay="linear",
                      distill=DistillConfig(logit_weight=0.0))
    pruner = Pruner(_bert(), cfg)
    x, y = _data()
    lrs = []
    fit(pruner, _batches(x, y), on_step=lambda s, m: lrs.append(
        [g["lr"] for g in pruner.optimizers["masks"].param_groups]))
    assert lrs[0] == pytest.approx([0.1, 0.01])  # log-variances, means
    assert lrs[5] == pytest.approx([0.05, 0.005])
    assert lrs[9] == pytest.approx([0.01, 0.001])
    logvars = {id(m.logvar) for _, m in pruner.vib.masks()}
    assert {id(p) for p in pruner.optimizers["masks"].param_groups[0]["params"]} == logvars


def test_training_curves_carry_active_fraction_and_kl_per_type() -> None:
    cfg = PruneConfig(method="faster", steps=3, distill=DistillConfig(logit_weight=0.0),
                      vib=vtrans.VIBConfig(logvar_init=-3.0, keep_sharpness=1.0))
    pruner = Pruner(_bert(), cfg)
    x, y = _data()
    h = fit(pruner, _batches(x, y))
    assert {"kl_hidden", "kl_heads", "kl_neurons", "kl_mha", "kl_ffn", "active_fraction"} <= set(h[0])
    assert sum(h[0][f"kl_{k}"] for k in ("hidden", "heads", "neurons", "mha", "ffn")) == pytest.approx(h[0]["kl"],
                                                                                                      rel=1e-4)
    assert h[0]["active_fraction"] == 1.0  # keep probabilities sigmoid(3) ~ 0.95: every unit in the live range


def test_a_stalled_lagrangian_is_reported_once() -> None:
    """The old initialisation (log-variance -9, sharpness 10): keep probabilities exactly 1, nothing moves."""
    x, y = _data()
    stalled = PruneConfig(method="faster", steps=4, warmup=0.5, budget=vtrans.Budget(params=0.5), init="constant",
                          constraint="lagrangian", distill=DistillConfig(logit_weight=0.0),
                          vib=vtrans.VIBConfig(logvar_init=-9.0, keep_sharpness=10.0))
    pruner = Pruner(_bert(), stalled)
    h = fit(pruner, _batches(x, y))
    assert pruner.stalled is not None and "has not moved towards the target" in pruner.stalled
    assert [m.get("stalled") for m in h] == [None, 1.0, None, None]  # at the end of the warm-up, once
    live = PruneConfig(method="faster", steps=4, warmup=0.5, budget=vtrans.Budget(params=0.5), lr_masks=0.5,
                       lr_lambdas=5.0, init="constant", constraint="lagrangian",
                       distill=DistillConfig(logit_weight=0.0),
                       vib=vtrans.VIBConfig(logvar_init=-3.0, keep_sharpness=1.0))
    pruner = Pruner(_bert(), live)
    fit(pruner, _batches(x, y))
    assert pruner.stalled is None


def test_reconstruct_lowers_the_layer_error_of_a_selection() -> None:
    from vtrans.fisher import layer_errors

    x, y = _data()
    get = _batches(x, y, bs=32)
    cfg = PruneConfig(method="faster", steps=2, budget=vtrans.Budget(params=0.5, tolerance=0.05), reconstruct=True,
                      distill=DistillConfig(logit_weight=0.0))
    pruner = Pruner(_bert(), cfg)
    fit(pruner, get)
    pruner.finish()
    calibration = [get(100), get(101)]
    before = layer_errors(pruner.vib, calibration)
    pruner.reconstruct(calibration)
    after = layer_errors(pruner.vib, calibration)
    assert sum(after) < sum(before)
    assert all(a <= b + 1e-9 for a, b in zip(after, before))


def test_fisher_warm_start_sets_keep_probabilities_from_kwons_selection() -> None:
    from vtrans.fisher import fisher_information, search_masks

    x, y = _data()
    get = _batches(x, y, bs=32)
    calibration = [get(100), get(101)]
    cfg = PruneConfig(method="faster", steps=2, budget=vtrans.Budget(params=0.5, tolerance=0.05), init="fisher",
                      init_keep=0.9, distill=DistillConfig(logit_weight=0.0),
                      vib=vtrans.VIBConfig(logvar_init=-3.0, keep_sharpness=1.0))
    pruner = Pruner(_bert(), cfg)
    pruner.warm_start(calibration)
    with pruner.vib.disabled():
        sel = search_masks(pruner.vib.geometry, fisher_information(pruner.model, calibration, blocks=False).scores(),
                           cfg.budget)
    k, t = cfg.vib.keep_sharpness, cfg.vib.threshold
    for i in range(pruner.vib.geometry.n_layers):
        for mask, keep in ((pruner.vib.heads[i], sel.groups[i]), (pruner.vib.neurons[i], sel.neurons[i])):
            p = mask.keep_prob(k, t).detach()
            assert torch.allclose(p[keep], torch.tensor(0.9), atol=1e-4)
            assert torch.allclose(p[~keep], torch.tensor(0.5), atol=1e-4)
    assert torch.allclose(pruner.vib.hidden.keep_prob(k, t).detach(), torch.tensor(0.9), atol=1e-4)
    assert 0.5 < float(pruner.expected_fraction().detach()) < 0.9  # kept at 0.9, the rest at 0.5
    with pytest.raises(vtrans.ConfigError, match="prune.init must be one of"):
        PruneConfig(init="magic")
    with pytest.raises(vtrans.ConfigError, match="prune.init_keep must be in"):
        PruneConfig(init_keep=0.3)


def test_fisher_warm_start_falls_back_when_kwons_search_cannot_reach_the_budget() -> None:
    """Kwon never prunes the hidden dimension (nor post-LN norms): below that floor the masks start uniform."""
    from vtrans.budget import Keep, size

    model = _bert()
    probe = vtrans.attach(model)
    g = probe.geometry
    floor = size(g, Keep(g.hidden, [0] * g.n_layers, [0] * g.n_layers, [0] * g.n_layers, [0] * g.n_layers), "params")
    fraction = 0.9 * floor / size(g, g.dense_keep(), "params")
    probe.remove()
    x, y = _data()
    get = _batches(x, y, bs=32)
    cfg = PruneConfig(method="faster", steps=2, budget=vtrans.Budget(params=fraction, tolerance=0.5),
                      distill=DistillConfig(logit_weight=0.0))
    pruner = Pruner(model, cfg)
    before = {n: m.logvar.detach().clone() for n, m in pruner.vib.named_modules() if hasattr(m, "logvar")}
    with pytest.warns(UserWarning, match="prune.init=fisher: Kwon's selection cannot start this budget"):
        pruner.warm_start([get(100)])
    after = {n: m.logvar.detach() for n, m in pruner.vib.named_modules() if hasattr(m, "logvar")}
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_projection_holds_the_expected_size_at_the_target_from_the_first_step(budget: float) -> None:
    """``constraint: projection``: during the warm-up the expected size after every pruning step is at most the
    warmed-up target and, where the masks had gone over it, equal to it (to the bisection's precision); after the
    warm-up it is held at the target both ways; the multipliers never move."""
    x, y = _data()
    cfg = PruneConfig(method="faster", steps=8, warmup=0.5, budget=vtrans.Budget(params=budget), init="constant",
                      constraint="projection", lr_masks=0.05, distill=DistillConfig(logit_weight=0.0))
    pruner = Pruner(_bert(), cfg)
    get = _batches(x, y)
    projected = 0
    for step in range(cfg.steps):
        pruner.begin_step(step)
        loss, _ = pruner(get(step), step)
        pruner.optimize(loss, step)
        s, t = float(pruner.expected_fraction().detach()), cfg.target_at(step)
        if step >= cfg.warmup_end():
            assert t == pytest.approx(budget) and s == pytest.approx(t, abs=1e-5)
        else:
            assert s <= t + 1e-6
        if pruner.last_offset != 0:
            projected += 1
            assert s == pytest.approx(t, abs=1e-6)
    assert projected >= cfg.steps // 2  # the warm-up pulls the target under the masks' size, the KL after it
    assert float(pruner.lagrangian.lambda1.detach()) == 0.0 and float(pruner.lagrangian.lambda2.detach()) == 0.0
    assert pruner.project(0.99) == 0.0  # under an upper bound: nothing moves


def test_projection_finds_the_common_offset_exactly() -> None:
    pruner = Pruner(_bert(), PruneConfig(method="faster", steps=2, init="constant", constraint="projection",
                                         distill=DistillConfig(logit_weight=0.0)))
    before = [m.log_alpha().detach().clone() for _, m in pruner.vib.masks()]
    offset = pruner.project(0.4)
    assert offset > 0 and float(pruner.expected_fraction()) == pytest.approx(0.4, abs=1e-6)
    for (_, m), b in zip(pruner.vib.masks(), before):  # one common shift of every unit's log_alpha
        assert torch.allclose(m.log_alpha().detach() - b, torch.full_like(b, offset), atol=1e-5)
    back = pruner.project(0.6, both_ways=True)  # held both ways: a size under the target is raised to it
    assert back < 0 and float(pruner.expected_fraction()) == pytest.approx(0.6, abs=1e-6)
    assert pruner.project(0.6, both_ways=True) == 0.0 or abs(pruner.last_offset) < 1e-4


def test_an_upper_bound_multiplier_never_winds_up_below_zero() -> None:
    """``constraint: upper``: while the target is above the expected size, lambda1 stays at 0 (``lagrangian`` lets it
    go negative and pull the masks back towards dense); lambda1 rises once the size is over the target."""
    x, y = _data()
    runs = {}
    for constraint in ("lagrangian", "upper"):
        cfg = PruneConfig(method="faster", steps=8, warmup=0.5, budget=vtrans.Budget(params=0.3), init="constant",
                          constraint=constraint, lr_lambdas=0.5, distill=DistillConfig(logit_weight=0.0),
                          vib=vtrans.VIBConfig(logvar_init=-2.0, keep_sharpness=1.0))  # expected size 0.69 at first
        pruner = Pruner(_bert(), cfg)
        runs[constraint] = [(m["lambda1"], m["expected_size"], m["target"]) for m in fit(pruner, _batches(x, y))]
    assert runs["lagrangian"][1][0] < 0  # the first ascent step: s < t, so lambda1 went negative
    assert all(lam >= 0.0 for lam, _, _ in runs["upper"])
    assert runs["upper"][-1][0] > 0  # the target fell below the size and lambda1 acted
    assert runs["upper"][-1][1] < runs["lagrangian"][-1][1]  # no wound-up multiplier holding the size up
    with pytest.raises(vtrans.ConfigError, match="prune.constraint must be one of"):
        PruneConfig(constraint="soft")


@pytest.mark.parametrize("constraint", ["projection", "lagrangian", "upper"])
@pytest.mark.parametrize("method", ["faster", "vtrans"])
def test_every_trainable_parameter_gets_a_gradient_in_a_pruning_step(method: str, constraint: str) -> None:
    """What DDP (Ray Train's ``prepare_model``) requires of a pruning step: a parameter that requires grad and gets none
    fails the next step on every worker ("Expected to have finished reduction in the prior iteration")."""
    x, y = _data()
    pruner = Pruner(_bert(), PruneConfig(method=method, steps=2, constraint=constraint, init="constant"))
    pruner.begin_step(0)
    loss, _ = pruner(_batches(x, y)(0), 0)
    loss.backward()
    missing = [n for n, p in pruner.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert any(p.requires_grad for p in pruner.lagrangian.parameters()) == (constraint != "projection")


@pytest.mark.parametrize("steps", [1, 3])
def test_the_final_expected_size_is_the_one_the_selection_starts_from(steps: int) -> None:
    """A step's ``expected_size`` is what its loss saw, one update behind; the run's final expected size is the one
    after its last update and projection (a one-step run would otherwise report its start)."""
    from vtrans.train import final_prune_metrics

    x, y = _data()
    cfg = PruneConfig(method="faster", steps=steps, budget=vtrans.Budget(params=0.5), init="constant",
                      distill=DistillConfig(logit_weight=0.0),
                      vib=vtrans.VIBConfig(logvar_init=-2.0, keep_sharpness=1.0))  # expected size 0.69 at first
    pruner = Pruner(_bert(), cfg)
    history = fit(pruner, _batches(x, y))
    assert history[0]["expected_size"] > 0.6  # the start, before the first update
    final = final_prune_metrics(history)
    assert final["final_expected_size"] == pytest.approx(0.5, abs=1e-5)
    assert final["final_expected_size"] == pytest.approx(float(pruner.expected_fraction().detach()), abs=1e-6)
    assert final["final_kl"] == history[-1]["kl"] and final_prune_metrics([{"step": 0, "loss": 1.0}]) == {}
