"""LoRA recovery (``finetune.method: lora``): only the adapters train, they merge into the weights exactly, the merged
checkpoint is the input's kind, resuming is exact, and bad input is one typed line - on heterogeneous compressed
models (a causal-LM Llama and a BERT classifier) for the fine-tune stage, and on dense models with their masks on for
the fine-tunes between pruning rounds."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import BertForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM

import vtrans
from tests.tiny import tiny
from vtrans.checkpoint import load_pretrained, load_state, save_state
from vtrans.errors import ConfigError
from vtrans.finetune import FinetuneConfig, Finetuner
from vtrans.lora import LoraConfig, add_adapters, block_linears, check_targets_at
from vtrans.train import PruneConfig, Pruner, fit

N, SEQ = 64, 10
REPO = Path(__file__).resolve().parents[2]


def _compressed(arch: str, cls, seed: int = 0):
    """A tiny model compressed by vtrans to random heterogeneous widths, layer 0's attention block removed."""
    model = tiny(arch, cls, seed=seed)
    if arch == "bert":
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    vib = vtrans.attach(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in vib.masks():
            keep = torch.rand(m.n, generator=gen) < 0.7
            keep[0] = True
            m.fix(keep)
    vib.mha.fix(torch.tensor([False, True]))
    small = vtrans.compress(vib).eval()
    for m in small.modules():  # no dropout anywhere: outputs compare exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return small


CASES = {"llama-causal-lm": ("llama", LlamaForCausalLM, "causal-lm"),
         "bert-seq-cls": ("bert", BertForSequenceClassification, "seq-cls")}


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    arch, cls, task = CASES[request.param]
    return arch, cls, task, _compressed(arch, cls)


def _batches(task: str, bs: int = 8):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, 60, (N, SEQ), generator=g)
    y = x if task == "causal-lm" else (x[:, 0] > 31).long()

    def get(step: int) -> dict[str, torch.Tensor]:
        idx = torch.randperm(N, generator=torch.Generator().manual_seed(step))[:bs]
        return {"input_ids": x[idx], "attention_mask": torch.ones_like(x[idx]), "labels": y[idx], "sample_id": idx}
    return get


def _config(task: str, steps: int = 6, **lora) -> FinetuneConfig:
    return FinetuneConfig(task=task, steps=steps, lr=1e-2, batch_size=8, method="lora",
                          lora=LoraConfig(**{"rank": 4, "alpha": 8.0, **lora}))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _loss(model, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss)


def test_only_the_adapters_train_and_merge_back_exactly(case) -> None:
    arch, cls, task, small = case
    model, before = copy.deepcopy(small), copy.deepcopy(small)
    keys = list(model.state_dict())
    ft = Finetuner(model, _config(task), teacher=None)
    adapters = ft.adapters.parameters()
    opt_params = [p for g in ft.optimizers["finetune"].param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for p in adapters}  # the optimizer holds the adapters only
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}
    assert len(adapters) == 2 * len(block_linears(before))  # A and B on every block Linear, nothing else
    assert not any("lora_" in n for n, _ in model.named_parameters() if "embed" in n or "classifier" in n
                   or "lm_head" in n or "pooler" in n)

    data = _batches(task, bs=N)(0)
    start = _loss(model, data)
    fit(ft, _batches(task))
    assert _loss(model, data) < start  # the adapters learn the task
    base = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    for name, p in before.named_parameters():  # every weight of the compressed model as it was
        assert torch.equal(base[name], p), name
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at 0

    ids = _batches(task)(0)["input_ids"]
    wrapped = _logits(model, ids)
    merged = ft.finish()
    assert merged is model and type(merged) is type(before) and ft.finish() is merged
    assert list(merged.state_dict()) == keys  # no base_layer / lora_ keys left
    assert {n for n, p in merged.named_parameters() if p.requires_grad} == \
        {n for n, p in before.named_parameters() if p.requires_grad}
    out = _logits(merged, ids)
    assert torch.allclose(out, wrapped, atol=1e-5), (out - wrapped).abs().max()
    assert (out - _logits(before, ids)).abs().max() > 1e-3  # the fine-tune changed what it computes


def test_the_merged_checkpoint_reloads_as_the_input_kind(case, tmp_path: Path) -> None:
    arch, cls, task, small = case
    model = copy.deepcopy(small)
    ft = Finetuner(model, _config(task, steps=3))
    fit(ft, _batches(task))
    merged = ft.finish()
    merged.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert not any("lora_" in k or "base_layer" in k for k in saved)
    loaded = load_pretrained(tmp_path, task=task)
    assert type(loaded) is type(small)
    ids = _batches(task)(1)["input_ids"]
    assert torch.allclose(_logits(loaded, ids), _logits(merged, ids), atol=1e-6)
    # the target check reads the checkpoint's config only (the pipeline's check before any worker starts)
    assert check_targets_at(tmp_path, task, LoraConfig()) == block_linears(loaded)


def test_resume_from_a_mid_run_checkpoint_gives_the_same_adapters(tmp_path: Path) -> None:
    small = _compressed("llama", LlamaForCausalLM)
    cfg = _config("causal-lm", steps=8, dropout=0.1)  # dropout: the per-step RNG must be restored too
    full = Finetuner(copy.deepcopy(small), cfg)
    fit(full, _batches("causal-lm"))

    part = Finetuner(copy.deepcopy(small), cfg)
    fit(part, _batches("causal-lm"), end_step=3)
    tensors, meta = part.state_tensors()
    model_keys = [k for k in tensors if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)  # the frozen weights are not in the checkpoint
    save_state(tmp_path, tensors, dict(meta, step=2))
    resumed = Finetuner(copy.deepcopy(small), cfg)
    tensors, meta = load_state(tmp_path)
    resumed.load_state_tensors(tensors, meta)
    fit(resumed, _batches("causal-lm"), start_step=meta["step"] + 1)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k

    with pytest.raises(ConfigError, match="finetune.method='full' cannot resume a checkpoint of "
                                          "finetune.method='lora'"):
        Finetuner(copy.deepcopy(small), FinetuneConfig(task="causal-lm", steps=8)).load_state_tensors(tensors, meta)


def test_target_modules_pick_the_named_layers() -> None:
    small = _compressed("llama", LlamaForCausalLM)
    adapters = add_adapters(small, LoraConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    # layer 0 lost its attention block: only layer 1 has the projections
    assert adapters.targets == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert {n.split(".lora_")[0] for n, _ in small.named_parameters() if "lora_" in n} == set(adapters.targets)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: LoraConfig(rank=0), "finetune.lora.rank must be an int >= 1, got 0"),
    (lambda: LoraConfig(rank=2.5), "finetune.lora.rank must be an int, got 2.5"),
    (lambda: LoraConfig(alpha=-1), "finetune.lora.alpha must be > 0, got -1"),
    (lambda: LoraConfig(dropout=1.5), "finetune.lora.dropout must be in [0, 1), got 1.5"),
    (lambda: LoraConfig(target_modules=[]), "finetune.lora.target_modules must be null or a non-empty list of "
                                            "module names, got []"),
    (lambda: LoraConfig(target_modules=["q_proj", ""]), "finetune.lora.target_modules[1] must be a non-empty "
                                                        "string, got ''"),
    (lambda: FinetuneConfig(method="qlora"), "finetune.method must be one of ['full', 'lora'], got 'qlora'; did you "
                                             "mean 'lora'?"),
    (lambda: Finetuner(_compressed("llama", LlamaForCausalLM), _config("causal-lm", target_modules=["qproj"])),
     "finetune.lora.target_modules names 'qproj', which matches no Linear layer of VtransLlamaForCausalLM; its "
     "blocks' Linear layers are ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
    (lambda: Finetuner(_compressed("bert", BertForSequenceClassification),
                       _config("seq-cls", target_modules=["query", "q_proj"])),
     "finetune.lora.target_modules names 'q_proj', which matches no Linear layer"),
])
def test_bad_input_is_one_typed_line_naming_key_and_value(make, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: a few seconds
def test_vtrans_imports_without_peft() -> None:
    code = ("import sys; sys.modules['peft'] = None; import vtrans, vtrans.finetune, vtrans.lora; "
            "vtrans.finetune.FinetuneConfig(method='lora')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_lora_without_peft_is_one_line_before_any_work(tmp_path: Path, monkeypatch) -> None:
    """Where peft cannot be imported (a --no-deps install), the pipeline's preflight check (``check_targets_at``) and
    the Finetuner fail in one typed line naming the key and the value, and the model is left as it was."""
    small = _compressed("llama", LlamaForCausalLM)
    small.save_pretrained(tmp_path / "small")
    before = {k: v.clone() for k, v in small.state_dict().items()}
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    for attempt in (lambda: check_targets_at(tmp_path / "small", "causal-lm", LoraConfig()),
                    lambda: Finetuner(small, _config("causal-lm"))):
        with pytest.raises(ConfigError) as info:
            attempt()
        text = str(info.value)
        assert text.startswith("finetune.method='lora' needs peft, which cannot be imported") and "\n" not in text
    after = small.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA between pruning rounds (PruneConfig.finetune_method: lora): the dense model, masks on, adapters merged per round
# ---------------------------------------------------------------------------------------------------------------------

ROUNDS_CASES = {"llama": ("llama", LlamaForCausalLM, "causal-lm"),
                "gpt2-conv1d": ("gpt2", GPT2LMHeadModel, "causal-lm"),
                "bert": ("bert", BertForSequenceClassification, "seq-cls")}


def _rounds_config(task: str, **kw) -> PruneConfig:
    base = dict(task=task, budget=vtrans.Budget(params=0.5, tolerance=0.05), steps=8, rounds=2, finetune_steps=4,
                batch_size=8, init="constant", finetune_lr=3e-2, finetune_method="lora",
                lora=LoraConfig(rank=2, alpha=4.0))
    base.update(kw)
    return PruneConfig(**base)


def _dense(arch: str, cls):
    if arch == "bert":
        return tiny(arch, cls, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tiny(arch, cls)


@pytest.mark.parametrize("name", list(ROUNDS_CASES))
def test_lora_between_rounds_trains_only_adapters_masked_like_the_weights_and_merges_exactly(name: str) -> None:
    """Inside the fine-tune between rounds only the adapters train (the weights and masks stay as round 1 left them,
    the optimizer holds 2 moments per adapter number, not per weight); the masks act on the adapters' path too, so the
    adapted masked model, the merged one and its compression at the round's budget compute the same; after the merge
    the model has its own keys and trainable flags again and the next round trains the weights."""
    arch, cls, task = ROUNDS_CASES[name]
    model = _dense(arch, cls)
    keys = list(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    cfg = _rounds_config(task)
    pruner = Pruner(model, cfg)
    seen: dict = {}

    def on_step(step: int, metrics: dict) -> None:
        if step == cfg.steps - 1:  # the end of round 1's pruning
            seen["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["masks"] = {k: v.clone() for k, v in pruner.vib.state_dict().items() if k.endswith(("mu", "logvar"))}
        if step == cfg.steps:
            assert pruner.adapters is not None
            seen["opt"] = [p for g in pruner.optimizers["finetune"].param_groups for p in g["params"]]

    batches = _batches(task)
    fit(pruner, batches, end_step=cfg.steps + cfg.finetune_steps, on_step=on_step)
    adapters = pruner.adapters.parameters()
    assert {id(p) for p in seen["opt"]} == {id(p) for p in adapters}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()
                                                                          if "lora_" in n}
    moments = sum(v.numel() for st in pruner.optimizers["finetune"].state.values() for k, v in st.items()
                  if k in ("exp_avg", "exp_avg_sq"))
    assert moments == 2 * sum(p.numel() for p in adapters) < 0.5 * sum(p.numel() for p in seen["weights"].values())
    base = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], w) for n, w in seen["weights"].items())  # the weights did not move
    assert all(torch.equal(pruner.vib.state_dict()[k], v) for k, v in seen["masks"].items())
    assert max(float(p.detach().abs().max()) for n, p in model.named_parameters() if "lora_B" in n) > 1e-3  # from 0

    ids = batches(0)["input_ids"]
    adapted = _logits(model, ids)  # masks fixed at round 1's budget, adapters on
    pruner.begin_step(cfg.steps_per_round)  # round 2: the adapters merge into the weights
    assert pruner.adapters is None and "finetune" not in pruner.optimizers and list(model.state_dict()) == keys
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    pruner.fix_round_budget(0)  # round 1's masks again (begin_step released them for round 2)
    merged = _logits(model, ids)
    compressed = _logits(vtrans.compress(pruner.vib), ids)
    assert torch.allclose(merged, adapted, atol=1e-5), (merged - adapted).abs().max()
    assert torch.allclose(compressed, adapted, atol=1e-4), (compressed - adapted).abs().max()
    merged_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(merged_weights[n], w) for n, w in seen["weights"].items())  # the merge moved them

    pruner.vib.release_budget()
    history = fit(pruner, batches, start_step=cfg.steps_per_round)
    assert any(not torch.equal(p, merged_weights[n]) for n, p in model.named_parameters())  # round 2 trains them
    assert all("lr_finetune" not in h for h in history)
    pruner.finish()
    assert vtrans.count(vtrans.compress(pruner.vib)).params_blocks <= 0.55 * vtrans.count(model).params_blocks


def test_lora_between_rounds_resumes_mid_phase_exactly(tmp_path: Path) -> None:
    """Stopped inside the LoRA fine-tune between rounds (adapter dropout on: the per-step RNG matters), saved and
    loaded into a fresh pruner, the run ends with the uninterrupted run's weights and masks; the checkpoint holds
    the weights under the model's own keys and the adapters apart."""
    cfg = _rounds_config("causal-lm", lora=LoraConfig(rank=2, alpha=4.0, dropout=0.1))
    batches = _batches("causal-lm")
    full = Pruner(tiny("llama", LlamaForCausalLM), cfg)
    fit(full, batches)

    part = Pruner(tiny("llama", LlamaForCausalLM), cfg)
    fit(part, batches, end_step=cfg.steps + 2)  # two steps into the fine-tune between rounds
    tensors, meta = part.state_tensors()
    assert not any("base_layer" in k or "lora_" in k for k in tensors if k.startswith("model."))
    assert {k for k in tensors if k.startswith("lora.")} == {f"lora.{n}" for n, _ in part.model.named_parameters()
                                                              if "lora_" in n}
    save_state(tmp_path, tensors, dict(meta, step=cfg.steps + 1))
    resumed = Pruner(tiny("llama", LlamaForCausalLM), cfg)
    tensors, meta = load_state(tmp_path)
    resumed.load_state_tensors(tensors, meta)
    assert resumed.adapters is not None
    fit(resumed, batches, start_step=meta["step"] + 1)
    for which in ("vib", "model"):
        a, b = getattr(full, which).state_dict(), getattr(resumed, which).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), (which, k)

    with pytest.raises(ConfigError, match=r"^prune.finetune_method='full' \(between rounds: 'full'\) cannot resume a "
                                          r"checkpoint whose fine-tunes between rounds were 'lora'"):
        Pruner(tiny("llama", LlamaForCausalLM), _rounds_config("causal-lm", finetune_method="full")) \
            .load_state_tensors(tensors, meta)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: PruneConfig(finetune_method="qlora"), "prune.finetune_method must be one of ['full', 'lora'], got "
                                                   "'qlora'; did you mean 'lora'?"),
    (lambda: PruneConfig(lora={"rank": 8}), "prune.lora must be a vtrans.lora.LoraConfig, got {'rank': 8}"),
    (lambda: Pruner(tiny("llama", LlamaForCausalLM), _rounds_config("causal-lm", lora=LoraConfig(
        target_modules=["qproj"]))), "finetune.lora.target_modules names 'qproj', which matches no Linear layer"),
])
def test_lora_between_rounds_bad_input_is_one_typed_line(make, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)
