"""Pipeline configs: every shipped YAML loads; overrides merge; every bad input is a ConfigError naming the full key
and the value; round trips, flattening and hashing are exact. No Ray, no MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import pipelines
from pipelines.config import (
    CalibrationConfig,
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    PipelineConfig,
    TrackingConfig,
    config_hash,
    flatten,
    from_dict,
    load_config,
    merge_overrides,
    parse_overrides,
    read_yaml,
    to_dict,
)
from vtrans import Budget, VtransError
from vtrans.errors import ConfigError
from vtrans.lora import LoraConfig

CONFIGS = Path(pipelines.__file__).parent / "configs"
SHIPPED = sorted(p for p in CONFIGS.glob("*.yaml") if "sweep" not in read_yaml(p))  # sweeps: test_sweep.py
MINILM = CONFIGS / "minilm-rotten-tomatoes.yaml"
SMOLLM2 = CONFIGS / "smollm2-wikipedia.yaml"
REPO = Path(__file__).resolve().parents[2]


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _write(tmp_path: Path, raw: dict, name: str = "edited.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# shipped configs
# ---------------------------------------------------------------------------------------------------------------------


def test_configs_are_shipped() -> None:
    assert {p.name for p in SHIPPED} >= {"minilm-rotten-tomatoes.yaml", "smollm2-wikipedia.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.name == path.stem
    assert cfg.task in ("seq-cls", "causal-lm")
    assert cfg.prune.task == cfg.finetune.task == cfg.task
    data = to_dict(cfg)
    assert json.loads(json.dumps(data)) == data  # plain JSON
    assert from_dict(PipelineConfig, data) == cfg
    # ... and through a YAML file again
    assert load_config(_write(tmp_path, data, path.name)) == cfg


def test_minilm_config_values() -> None:
    cfg = load_config(MINILM)
    assert (cfg.model.name, cfg.model.task, cfg.model.num_labels, cfg.model.teacher) == ("minilm", "seq-cls", 2, None)
    assert (cfg.data.name, cfg.data.files, cfg.data.label_column) == ("rotten_tomatoes", None, "label")
    assert cfg.calibration == CalibrationConfig(fraction=0.03, count=None, stratified=True, seed=0)
    assert (cfg.teacher.steps, cfg.teacher.lr, cfg.teacher.batch_size) == (250, 1e-4, 32)
    p = cfg.prune
    assert (p.method, p.steps, p.batch_size, p.lr_masks, p.rounds) == ("faster", 200, 16, 0.05, 1)
    assert (p.constraint, p.mask_lr_decay) == ("projection", "linear")
    assert p.budget == Budget(params=0.5, scope="blocks", seq_len=128)
    assert p.calibration_fraction == 0.03 and cfg.calibrates
    assert (cfg.finetune.steps, cfg.finetune.lr, cfg.finetune.batch_size) == (150, 5e-5, 16)
    assert cfg.evaluate.metrics == ["accuracy"]
    assert (cfg.evaluate.latency_batch_sizes, cfg.evaluate.latency_seq_lens) == ([1, 32], [128])
    assert (cfg.ray.num_workers, cfg.ray.use_gpu, cfg.ray.address) == (2, False, None)
    assert (cfg.tracking.uri, cfg.tracking.experiment, cfg.output) == (None, "vtrans", "runs")


def test_smollm2_config_values() -> None:
    cfg = load_config(SMOLLM2)
    assert (cfg.model.name, cfg.task, cfg.data.name, cfg.data.seq_len) == ("smollm2", "causal-lm", "wikipedia", 128)
    assert cfg.prune.task == cfg.finetune.task == "causal-lm"  # derived: the YAML leaves them out
    assert (cfg.prune.method, cfg.prune.budget) == ("faster", Budget(params=0.7, seq_len=128))
    assert cfg.prune.reconstruct is True and load_config(MINILM).prune.reconstruct is False  # D1 / R19
    assert (cfg.prune.steps, cfg.prune.init) == (1, "fisher")  # on SmolLM2 the VIB steps cost perplexity: D1 / D5
    assert cfg.calibration == CalibrationConfig(fraction=None, count=256, stratified=False, seed=0)
    assert cfg.evaluate.metrics == ["perplexity"]
    assert cfg.prune.distill.cache_teacher is False


# ---------------------------------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------------------------------


def test_parse_overrides() -> None:
    tree = parse_overrides(["prune.budget.params=0.3", "ray.num_workers=2", "data.files=[a.csv,b.csv]",
                            "ray.use_gpu=true", "tracking.uri=", "finetune.lr=1e-4", "model.name=org/model"])
    assert tree == {"prune": {"budget": {"params": 0.3}}, "ray": {"num_workers": 2, "use_gpu": True},
                    "data": {"files": ["a.csv", "b.csv"]}, "tracking": {"uri": None}, "finetune": {"lr": 1e-4},
                    "model": {"name": "org/model"}}
    assert parse_overrides(["prune.steps=1", "prune.steps=2"]) == {"prune": {"steps": 2}}  # last wins
    assert parse_overrides(["data.seed=yes"]) == {"data": {"seed": "yes"}}  # YAML 1.2: yes is a string


def test_nested_and_typed_overrides() -> None:
    cfg = load_config(MINILM, ["prune.budget.params=0.3", "prune.vib.kl_multipliers.heads=2", "prune.steps=7",
                               "evaluate.latency_batch_sizes=[1, 4, 16]", "ray.use_gpu=true", "ray.num_workers=1",
                               "finetune.lr=1e-4", "calibration.stratified=false", "tracking.uri=http://h:5000"])
    assert cfg.prune.budget == Budget(params=0.3, scope="blocks", seq_len=128)
    assert cfg.prune.vib.kl_multipliers == {"hidden": 1.0, "heads": 2.0, "neurons": 1.0, "mha": 1.0, "ffn": 1.0}
    assert cfg.prune.steps == 7 and cfg.evaluate.latency_batch_sizes == [1, 4, 16]
    assert cfg.ray.use_gpu is True and cfg.ray.num_workers == 1 and cfg.calibration.stratified is False
    assert cfg.finetune.lr == 1e-4 and isinstance(cfg.finetune.lr, float)
    assert cfg.tracking.uri == "http://h:5000"


def test_lora_keys_load_from_overrides() -> None:
    cfg = load_config(SMOLLM2, ["finetune.method=lora", "finetune.lora.rank=4", "finetune.lora.alpha=8",
                                "finetune.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.finetune.method == "lora" and cfg.finetune.lora == LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                                                                             target_modules=["q_proj", "v_proj"])
    assert isinstance(cfg.finetune.lora.alpha, float)
    flat = flatten(cfg)
    assert flat["finetune.method"] == "lora" and flat["finetune.lora.target_modules"] == '["q_proj", "v_proj"]'
    assert load_config(SMOLLM2, [f"{k}={v}" for k, v in flat.items()]) == cfg
    default = load_config(SMOLLM2)
    assert default.finetune.method == "full" and default.finetune.lora == LoraConfig()


def test_budget_override_replaces_the_budget_kind() -> None:
    cfg = load_config(MINILM, ["prune.budget.flops=0.4"])
    assert cfg.prune.budget == Budget(flops=0.4, scope="blocks", seq_len=128)
    cfg = load_config(MINILM, ["prune.budget={flops: 0.3, seq_len: 256}"])
    assert cfg.prune.budget == Budget(flops=0.3, scope="blocks", seq_len=256)
    cfg = load_config(MINILM, ["prune.budget.seq_len=64"])  # other budget keys keep the kind
    assert cfg.prune.budget == Budget(params=0.5, scope="blocks", seq_len=64)


def test_calibration_and_data_overrides_replace_their_alternative(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(MINILM, ["calibration.count=100"])
    assert (cfg.calibration.fraction, cfg.calibration.count) == (None, 100)
    assert cfg.prune.calibration_fraction == 0.03  # unused with a count; stays at the default
    assert load_config(MINILM, ["calibration.fraction=0.1"]).prune.calibration_fraction == 0.1  # follows
    monkeypatch.chdir(tmp_path)
    for f in ("a.csv", "b.csv"):
        Path(f).write_text("text,label\ngood,1\nbad,0\n")
    cfg = load_config(MINILM, ["data.files=[a.csv,b.csv]"])
    assert (cfg.data.name, cfg.data.files, cfg.task) == (None, ["a.csv", "b.csv"], "seq-cls")


def test_merge_overrides_copies() -> None:
    raw = _raw(MINILM)
    before = json.dumps(raw)
    merged = merge_overrides(raw, ["prune.steps=3"])
    assert merged["prune"]["steps"] == 3 and json.dumps(raw) == before


def test_auto_task_and_defaults_from_a_minimal_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded default is what is checked
    Path("d.jsonl").write_text('{"text": "a", "y": 1}\n{"text": "b", "y": 0}\n')
    path = _write(tmp_path, {"model": {"name": "minilm"}, "data": {"files": ["d.jsonl"]}}, "my-lm.yaml")
    cfg = load_config(path)
    assert (cfg.name, cfg.task, cfg.prune.task, cfg.finetune.task) == ("my-lm", "causal-lm", "causal-lm", "causal-lm")
    assert cfg.calibration.stratified is False and cfg.evaluate.metrics == ["perplexity"]
    cfg = load_config(path, ["data.label_column=y", "name=cls"])
    assert (cfg.name, cfg.task, cfg.prune.task) == ("cls", "seq-cls", "seq-cls")
    assert cfg.calibration.stratified is True and cfg.evaluate.metrics == ["accuracy"]
    assert cfg.tracking.resolved_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert TrackingConfig(uri="http://h:5000").resolved_uri() == "http://h:5000"


def test_empty_section_takes_defaults_and_hub_ids_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _raw(SMOLLM2)
    raw["teacher"] = None  # "teacher:" with every key commented out
    cfg = load_config(_write(tmp_path, raw, SMOLLM2.name), ["model.name=HuggingFaceTB/SmolLM2-135M"])
    assert cfg.teacher == load_config(SMOLLM2, ["teacher.steps=0"]).teacher
    assert cfg.model.name == "HuggingFaceTB/SmolLM2-135M"  # a hub id: resolved when the pipeline runs
    monkeypatch.chdir(tmp_path)
    Path("runs").mkdir()
    with pytest.raises(ConfigError, match=r"model\.name .* got 'runs/model' \(no such directory\)"):
        load_config(SMOLLM2, ["model.name=runs/model"])  # runs/ is local: a wrong path, not a hub id


def test_direct_construction_resolves_sections() -> None:
    cfg = PipelineConfig(model=ModelConfig("smollm2"), data=DataConfig(name="wikipedia"))
    assert (cfg.task, cfg.prune.task, cfg.finetune.task) == ("causal-lm", "causal-lm", "causal-lm")
    assert cfg.evaluate.metrics == ["perplexity"] and cfg.calibration == CalibrationConfig(0.03, None, False, 0)
    assert from_dict(PipelineConfig, to_dict(cfg)) == cfg


# ---------------------------------------------------------------------------------------------------------------------
# bad input: (overrides, edit of the YAML mapping, config, substrings the message must contain)
# ---------------------------------------------------------------------------------------------------------------------


def _set(*path_and_value: object) -> Callable[[dict], None]:
    *keys, value = path_and_value

    def edit(raw: dict) -> None:
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value

    return edit


BAD: list[tuple[str, list[str], Callable[[dict], None] | None, Path, tuple[str, ...]]] = [
    ("typo-override", ["prune.setps=3"], None, MINILM,
     ("unknown key 'prune.setps'", "did you mean 'prune.steps'?")),
    ("typo-section", ["tracknig.uri=x"], None, MINILM, ("unknown key 'tracknig'", "did you mean 'tracking'?")),
    ("typo-yaml-nested", [], _set("prune", "budget", "parms", 0.5), MINILM,
     ("unknown key 'prune.budget.parms'", "did you mean 'prune.budget.params'?")),
    ("unknown-key-no-match", ["zzz=1"], None, MINILM, ("unknown key 'zzz'", "valid keys", "'prune'")),
    ("str-for-int", ["prune.steps=ten"], None, MINILM, ("prune.steps must be an int", "'ten'")),
    ("bool-for-int", ["ray.num_workers=true"], None, MINILM, ("ray.num_workers must be an int", "True")),
    ("float-for-int", ["data.max_length=64.5"], None, MINILM, ("data.max_length must be an int", "64.5")),
    ("null-for-int", ["prune.steps=null"], None, MINILM, ("prune.steps must be an int", "None")),
    ("str-for-bool", ["ray.use_gpu=yes"], None, MINILM, ("ray.use_gpu must be a bool (true or false)", "'yes'")),
    ("str-for-float", ["finetune.lr='1e-4'"], None, MINILM, ("finetune.lr must be a number", "'1e-4'")),
    ("list-item-type", ["evaluate.latency_batch_sizes=[1, x]"], None, MINILM,
     ("evaluate.latency_batch_sizes[1] must be an int", "'x'")),
    ("scalar-for-section", ["prune=3"], None, MINILM, ("prune must be a mapping (section PruneConfig)", "3")),
    ("non-finite", ["prune.lr_masks=.inf"], None, MINILM, ("prune.lr_masks must be a finite number", "inf")),
    ("budget-out-of-range", ["prune.budget.params=1.5"], None, MINILM, ("prune.budget.params", "1.5")),
    ("budget-both-in-yaml", [], _set("prune", "budget", "flops", 0.4), MINILM,
     ("prune.budget needs exactly one of params, flops or latency", "params=0.5", "flops=0.4")),
    ("budget-both-overridden", ["prune.budget.flops=0.4", "prune.budget.params=0.3"], None, MINILM,
     ("prune.budget needs exactly one of params, flops or latency", "params=0.3", "flops=0.4")),
    ("budget-scope", ["prune.budget.scope=layers"], None, MINILM, ("prune.budget.scope", "'layers'")),
    ("calibration-both", [], _set("calibration", "count", 100), MINILM,
     ("calibration.fraction=0.03", "calibration.count=100", "exactly one")),
    ("calibration-fraction-range", ["calibration.fraction=0"], None, MINILM,
     ("calibration.fraction must be in (0, 1]", "0.0")),
    ("unknown-method", ["prune.method=fastest"], None, MINILM, ("prune.method must be one of", "'fastest'")),
    ("rounds-zero", ["prune.rounds=0"], None, MINILM, ("prune.rounds", "got 0")),
    ("num-workers-zero", ["ray.num_workers=0"], None, MINILM, ("ray.num_workers", "got 0")),
    ("vib-nested", ["prune.vib.kl_weight=-1"], None, MINILM, ("prune.vib.kl_weight must be >= 0", "-1")),
    ("vib-multiplier", ["prune.vib.kl_multipliers.head=2"], None, MINILM,
     ("prune.vib.kl_multipliers", "unknown structure 'head'")),
    ("distill-nested", ["prune.distill.temperature=0"], None, MINILM, ("prune.distill.temperature", "got 0")),
    ("finetune-hidden", ["finetune.distill.hidden_weight=0.5"], None, MINILM,
     ("finetune.distill.hidden_weight must be 0", "0.5")),
    ("task-data-mismatch", ["data.name=wikipedia"], None, MINILM, ("data.name='wikipedia'", "model.task='seq-cls'")),
    ("task-typo", ["model.task=seq_cls"], None, MINILM, ("model.task must be one of", "'seq_cls'", "'seq-cls'")),
    ("metric-task-mismatch", ["evaluate.metrics=[perplexity]"], None, MINILM,
     ("evaluate.metrics[0]='perplexity'", "seq-cls")),
    ("metric-unknown", ["evaluate.metrics=[acc]"], None, MINILM, ("evaluate.metrics[0]", "'acc'", "'accuracy'")),
    ("prune-task-contradicts", ["prune.task=causal-lm"], None, MINILM,
     ("prune.task='causal-lm'", "model.task='seq-cls'")),
    ("prune-task-default-contradicts", ["prune.task=seq-cls"], None, SMOLLM2,
     ("prune.task='seq-cls'", "model.task='causal-lm'")),
    ("calibration-fraction-contradicts", ["prune.calibration_fraction=0.2"], None, MINILM,
     ("prune.calibration_fraction=0.2", "calibration.fraction=0.03")),
    ("stratified-lm", ["calibration.stratified=true"], None, SMOLLM2,
     ("calibration.stratified=True", "model.task='causal-lm'")),
    ("num-labels-lm", ["model.num_labels=2"], None, SMOLLM2, ("model.num_labels must be null", "2")),
    ("label-column-lm", ["data.label_column=label"], None, SMOLLM2, ("data.label_column must be null", "'label'")),
    ("model-typo", ["model.name=minlm"], None, MINILM, ("model.name", "'minlm'", "did you mean 'minilm'?")),
    ("teacher-missing", ["model.teacher=nowhere/teacher"], None, MINILM, ("model.teacher", "'nowhere/teacher'")),
    ("missing-data-file", ["data.files=[missing.csv]"], None, MINILM,
     ("data.files[0] does not exist", "'missing.csv'")),
    ("data-file-format", ["data.files=[notes.txt]"], None, MINILM, ("data.files[0] must end in", "'notes.txt'")),
    ("data-both", [], _set("data", "files", ["x.csv"]), MINILM,
     ("data.name='rotten_tomatoes'", "data.files=['x.csv']", "exactly one")),
    ("test-fraction", ["data.test_fraction=1"], None, MINILM, ("data.test_fraction must be in (0, 1)", "1.0")),
    ("batch-workers", ["prune.batch_size=15"], None, MINILM, ("prune.batch_size=15", "ray.num_workers=2")),
    ("eval-every-negative", ["finetune.eval_every=-5"], None, MINILM, ("finetune.eval_every must be", "-5")),
    ("eval-samples-zero", ["finetune.eval_samples=0"], None, MINILM, ("finetune.eval_samples must be", "got 0")),
    ("eval-samples-too-many", ["finetune.eval_every=10", "data.max_train_samples=300", "finetune.eval_samples=290"],
     None, MINILM, ("finetune.eval_samples=290", "data.max_train_samples=300", "finetune.batch_size=")),
    ("finetune-method", ["finetune.method=qlora"], None, MINILM,
     ("finetune.method must be one of ['full', 'lora'], got 'qlora'", "did you mean 'lora'?")),
    ("lora-rank-zero", ["finetune.method=lora", "finetune.lora.rank=0"], None, MINILM,
     ("finetune.lora.rank must be an int >= 1, got 0",)),
    ("lora-alpha-negative", ["finetune.lora.alpha=-1"], None, SMOLLM2, ("finetune.lora.alpha must be > 0, got -1",)),
    ("lora-dropout-range", ["finetune.lora.dropout=1.5"], None, MINILM,
     ("finetune.lora.dropout must be in [0, 1), got 1.5",)),
    ("lora-targets-empty", ["finetune.lora.target_modules=[]"], None, MINILM,
     ("finetune.lora.target_modules must be null or a non-empty list", "got []")),
    ("lora-targets-type", ["finetune.lora.target_modules=q_proj"], None, SMOLLM2,
     ("finetune.lora.target_modules must be a list of strings or null", "'q_proj'")),
    ("lora-typo", ["finetune.lora.rnak=4"], None, MINILM,
     ("unknown key 'finetune.lora.rnak'", "did you mean 'finetune.lora.rank'?")),
    ("strategy-typo", ["ray.strategy=fdsp"], None, MINILM,
     ("ray.strategy must be one of ['ddp', 'fsdp'], got 'fdsp'", "did you mean 'fsdp'?")),
    ("fsdp-one-worker", ["ray.strategy=fsdp", "ray.num_workers=1"], None, MINILM,
     ("ray.strategy='fsdp'", "ray.num_workers >= 2", "got ray.num_workers=1")),
    ("prune-finetune-method-contradicts", ["prune.finetune_method=lora"], None, MINILM,
     ("prune.finetune_method='lora' contradicts finetune.method='full'", "leave prune.finetune_method out")),
    ("duplicate-metric", ["evaluate.metrics=[accuracy, accuracy]"], None, MINILM,
     ("evaluate.metrics lists a metric twice", "'accuracy'")),
    ("lm-eval-seq-cls", ["evaluate.lm_eval_tasks=[lambada_local]"], None, MINILM,
     ("evaluate.lm_eval_tasks=['lambada_local'] needs a causal LM", "model.task='seq-cls'")),
    ("lm-eval-not-a-list", ["evaluate.lm_eval_tasks=lambada_local"], None, SMOLLM2,
     ("evaluate.lm_eval_tasks must be a list", "'lambada_local'")),
    ("lm-eval-empty", ["evaluate.lm_eval_tasks=[]"], None, SMOLLM2, ("evaluate.lm_eval_tasks must be a non-empty",)),
    ("lm-eval-blank-name", ["evaluate.lm_eval_tasks=[lambada_local, ' ']"], None, SMOLLM2,
     ("evaluate.lm_eval_tasks[1] must be a non-empty string", "' '")),
    ("lm-eval-twice", ["evaluate.lm_eval_tasks=[lambada_local, lambada_local]"], None, SMOLLM2,
     ("evaluate.lm_eval_tasks lists a task twice",)),
    ("lm-eval-limit-zero", ["evaluate.lm_eval_tasks=[lambada_local]", "evaluate.lm_eval_limit=0"], None, SMOLLM2,
     ("evaluate.lm_eval_limit must be an int >= 1, got 0",)),
    ("lm-eval-limit-alone", ["evaluate.lm_eval_limit=8"], None, SMOLLM2,
     ("evaluate.lm_eval_limit=8", "evaluate.lm_eval_tasks is not set")),
    ("run-name", ["name=my run"], None, MINILM, ("name must be", "'my run'")),
    ("missing-section", [], lambda raw: raw.pop("model"), MINILM, ("model is required",)),
    ("malformed-override", ["prune.steps"], None, MINILM, ("override 'prune.steps'", "key=value")),
    ("bad-override-key", ["prune..steps=1"], None, MINILM, ("override 'prune..steps=1'", "dotted key")),
    ("override-bad-yaml", ["data.files=[a.csv"], None, MINILM, ("override 'data.files=[a.csv'", "not valid YAML")),
    ("override-conflict", ["prune.steps=1", "prune.steps.x=2"], None, MINILM,
     ("override 'prune.steps.x=2'", "prune.steps", "set to 1")),
]


@pytest.mark.parametrize(("overrides", "edit", "path", "needles"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_input_names_key_and_value(overrides: list[str], edit: Callable[[dict], None] | None, path: Path,
                                       needles: tuple[str, ...], tmp_path: Path) -> None:
    if edit is not None:
        raw = _raw(path)
        edit(raw)
        path = _write(tmp_path, raw, path.name)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert isinstance(info.value, VtransError) and isinstance(info.value, ValueError)
    assert "\n" not in message


def test_teacher_given_and_trained_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"teacher\.steps=250 .* model\.teacher="):
        load_config(MINILM, [f"model.teacher={tmp_path}"])
    assert load_config(MINILM, [f"model.teacher={tmp_path}", "teacher.steps=0"]).model.teacher == str(tmp_path)


@pytest.mark.parametrize(("text", "needle"), [
    (None, "not found"),
    ("", "must hold a mapping of sections"),
    ("- model\n- data\n", "must hold a mapping of sections"),
    ("model: {name: minilm\n", "is not valid YAML"),
    ("model:\n  name: minilm\n  name: smollm2\n", "found key 'name' twice"),
])
def test_bad_files_name_the_path(text: str | None, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize(("make", "needle"), [
    (lambda: DataConfig(), "exactly one of data.name or data.files"),
    (lambda: DataConfig(name="imdb"),
     "data.name must be one of ['rotten_tomatoes', 'wikipedia', 'lee_news'], got 'imdb'"),
    (lambda: CalibrationConfig(count=0), "calibration.count must be an int >= 1, got 0"),
    (lambda: EvaluateConfig(latency_seq_lens=[]), "evaluate.latency_seq_lens must be a non-empty list"),
    (lambda: ModelConfig("minilm", num_labels=1), "model.num_labels must be an int >= 2, got 1"),
    (lambda: TrackingConfig(experiment=""), "tracking.experiment must be a non-empty string, got ''"),
])
def test_sections_check_direct_construction(make: Callable[[], object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert needle in str(info.value)


def test_from_dict_sections() -> None:
    assert from_dict(Budget, {"flops": 0.4, "seq_len": 64}, "prune.budget") == Budget(flops=0.4, seq_len=64)
    assert from_dict(Budget, {"params": 5_000_000}, "b").value == 5_000_000  # int stays int (absolute count)
    with pytest.raises(ConfigError, match=r"^unknown key 'b\.flop'; did you mean 'b\.flops'\?$"):
        from_dict(Budget, {"flop": 0.4}, "b")
    with pytest.raises(ConfigError, match=r"evaluate\.latency_repeats must be an int, got '3'"):
        from_dict(EvaluateConfig, {"latency_repeats": "3"}, "evaluate")


# ---------------------------------------------------------------------------------------------------------------------
# flatten, hash, imports
# ---------------------------------------------------------------------------------------------------------------------


def test_flatten() -> None:
    cfg = load_config(MINILM)
    flat = flatten(cfg)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in flat.items())
    assert flat["prune.budget.params"] == "0.5" and flat["prune.budget.flops"] == "null"
    assert flat["prune.vib.kl_multipliers.heads"] == "1.0" and flat["prune.vib.kl_weight"] == "0.01"
    assert flat["evaluate.latency_batch_sizes"] == "[1, 32]" and flat["evaluate.metrics"] == '["accuracy"]'
    assert flat["ray.num_workers"] == "2" and flat["ray.use_gpu"] == "false" and flat["tracking.uri"] == "null"
    assert flat["model.name"] == "minilm" and flat["name"] == "minilm-rotten-tomatoes"
    assert not any(isinstance(v, dict) for v in flat.values())
    # every item is an override reproducing its value
    assert load_config(MINILM, [f"{k}={v}" for k, v in flat.items()]) == cfg
    cfg.data.text_column = "true"  # a string YAML would read as a bool is quoted
    assert flatten(cfg)["data.text_column"] == '"true"'


def test_config_hash_is_stable_and_sensitive() -> None:
    a, b = load_config(MINILM), load_config(MINILM)
    h = config_hash(a)
    assert h == config_hash(b) and len(h) == 16 and int(h, 16) >= 0
    assert config_hash(a.prune) == config_hash(to_dict(a.prune)) != config_hash(a.finetune)
    c = load_config(MINILM, ["prune.steps=101"])
    assert config_hash(c) != h and config_hash(c.prune) != config_hash(a.prune)
    d = load_config(MINILM, ["evaluate.latency_repeats=5"])
    assert config_hash(d) != h and config_hash(d.prune) == config_hash(a.prune)  # other sections: same prune key
    assert config_hash(load_config(MINILM, ["prune.budget.params=0.50"])) == h


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (vtrans): about 5 s
def test_import_loads_neither_ray_nor_mlflow() -> None:
    code = ("import sys, pipelines.config; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')); "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_mlflow_experiment_name_fills_in_an_experiment_the_config_leaves_out(monkeypatch) -> None:
    from pipelines.config import PipelineConfig, from_dict

    raw = {"model": {"name": "minilm"}, "data": {"name": "rotten_tomatoes"}}
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert from_dict(PipelineConfig, raw).tracking.experiment == "vtrans"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert from_dict(PipelineConfig, raw).tracking.experiment == "from-env"
    assert from_dict(PipelineConfig, {**raw, "tracking": {"experiment": "pinned"}}).tracking.experiment == "pinned"
    assert load_config(CONFIGS / "minilm-rotten-tomatoes.yaml").tracking.experiment == "from-env"
    assert load_config(CONFIGS / "minilm-rotten-tomatoes.yaml",
                       ["tracking.experiment=over"]).tracking.experiment == "over"
