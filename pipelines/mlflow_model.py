"""The MLflow model of a compressed checkpoint: MLflow's ``transformers`` flavor, whose ``python_function`` flavor is
loaded by this installed module.

One logged model serves both of MLflow's entry points:

```python
model = mlflow.pyfunc.load_model("models:/vtrans-minilm@champion")      # this module's loader: no stored code runs
model.predict(["a gripping film", "dull"])       # seq-cls: label (the class name, e.g. "fresh"), score, probabilities
model.predict(["Once upon a time"], params={"max_new_tokens": 20})      # causal-lm: generated_text
model.get_raw_model().checkpoint                                        # the HF directory (from_pretrained)

import vtrans                                     # a heterogeneous checkpoint's classes (a uniform one needs nothing)
pipe = pipelines.registry.load_transformers("models:/vtrans-minilm@champion", "downloads/champion")  # checked first
```

What is logged (:func:`log_compressed`): the checkpoint without any Python file and without ``auto_map`` (so nothing
stored with it can run, even where MLflow's own loader passes ``trust_remote_code=True``), with the class names of the
task in ``id2label`` when the data had them, and its model card; the ``transformers`` flavor records the task's Auto
class where the architecture is vtrans's own (``vtrans_llama`` ...), which ``import vtrans`` registers. The
``python_function`` flavor names this module as its loader (``loader_module``): MLflow imports it from the installed
vtrans, never from the artifact store, and it loads the weights through :func:`vtrans.checkpoint.load_pretrained`
(an ``auto_map`` naming stored code is refused).

``mlflow.transformers.load_model`` on its own trusts the artifact store: for a class transformers does not ship it loads
the config with ``trust_remote_code=True``. :func:`pipelines.registry.load_transformers` downloads the model and
checks it (no Python file, no ``auto_map`` to stored code, complete safetensors) before handing it to MLflow.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

#: vtrans task -> the transformers pipeline task of the flavor.
PIPELINE_TASKS = {"seq-cls": "text-classification", "causal-lm": "text-generation"}
#: vtrans task -> the Auto class the flavor records for a vtrans architecture (transformers ships no such class name).
AUTO_CLASSES = {"seq-cls": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}
#: The flavor's folder holding the checkpoint (``mlflow.transformers``' ``model_binary``).
MODEL_FOLDER = "model"
#: Parameters of ``predict`` (the signature's params, with their defaults).
PARAMS = {"batch_size": 32, "max_length": 128, "max_new_tokens": 32}


def _texts(model_input) -> list[str]:
    if hasattr(model_input, "columns"):  # a DataFrame: the ``text`` column, else the first one
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[column].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    # one unnamed string column: a list of texts, a single text or a DataFrame (its ``text`` or only column)
    return ModelSignature(inputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec(k, "long", v) for k, v in PARAMS.items()]))


def _with_label_names(model, label_names: Sequence[str] | None):
    """``model`` with the task's class names as ``id2label`` / ``label2id`` (None: left as they are)."""
    if label_names is not None:
        n = model.config.num_labels
        if len(label_names) != n:
            raise ValueError(f"label_names has {len(label_names)} names for a model with {n} labels")
        model.config.id2label = {i: str(name) for i, name in enumerate(label_names)}
        model.config.label2id = {str(name): i for i, name in enumerate(label_names)}
    return model


def save_model(path: str, mlflow_model, checkpoint: str, task: str, label_names: Sequence[str] | None = None,
               pip_requirements: list[str] | None = None, signature=None, input_example=None, metadata=None,
               **kwargs) -> None:
    """The flavor module's ``save_model`` for :meth:`mlflow.models.Model.log`: the checkpoint loaded by vtrans (with
    the class names, when given) and saved by ``mlflow.transformers`` as a pipeline of the task; its folder cleaned of
    what ``save_pretrained`` adds for people without vtrans (the modeling file and ``auto_map``: nothing stored with
    the model can run, even where MLflow's loader passes ``trust_remote_code=True``) and given back the checkpoint's
    own files (model card, compression record) and its tokenizer; then the flavor's model class becomes the task's
    Auto class for a vtrans architecture and the pyfunc's loader this module."""
    import mlflow
    import torch
    import transformers
    from huggingface_hub import ModelCard

    from vtrans.checkpoint import load_pretrained, load_tokenizer

    src = Path(checkpoint)
    model = _with_label_names(load_pretrained(src, task=task, dtype=torch.float32).eval(), label_names)
    tokenizer = load_tokenizer(src)
    card = src / "README.md"
    # (MLflow 3.17's path for a checkpoint folder, transformers_model=str, fails on transformers 5: pipeline objects)
    mlflow.transformers.save_model(transformers_model={"model": model, "tokenizer": tokenizer}, path=path,
                                   task=PIPELINE_TASKS[task], mlflow_model=mlflow_model,
                                   signature=signature or _signature(), input_example=input_example,
                                   pip_requirements=pip_requirements, metadata=metadata,
                                   model_card=ModelCard.load(card) if card.is_file() else None, **kwargs)
    out = Path(path) / mlflow_model.flavors["transformers"].get("model_binary", MODEL_FOLDER)
    for code in out.rglob("*.py"):
        code.unlink()
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    if config.pop("auto_map", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for extra in src.iterdir():  # the model card, compression.json, ...: what save_pretrained does not write
        if extra.is_file() and not (out / extra.name).exists() and extra.suffix != ".py" and \
                not extra.name.endswith(".safetensors"):
            shutil.copy2(extra, out / extra.name)
    tokenizer.save_pretrained(out)  # the folder is a whole Hugging Face checkpoint (download_checkpoint)
    flavor = mlflow_model.flavors["transformers"]
    if not hasattr(transformers, flavor["pipeline_model_type"]):  # a vtrans class: the Auto class finds it
        flavor["pipeline_model_type"] = AUTO_CLASSES[task]
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.save(str(Path(path) / "MLmodel"))


def log_compressed(model_dir: str | Path, task: str, label_names: Sequence[str] | None = None,
                   pip_requirements: list[str] | None = None, name: str = "model"):
    """Log ``model_dir`` (a compressed checkpoint) into the active run as this module's MLflow model (see the module
    docstring); returns MLflow's ``ModelInfo``. MLflow checks the input example by loading it with this module."""
    import sys

    from mlflow.models import Model

    example = ["a gripping film", "dull"] if task == "seq-cls" else ["The history of"]
    return Model.log(None, sys.modules[__name__], name=name, checkpoint=str(model_dir), task=task,
                     label_names=label_names, pip_requirements=pip_requirements, signature=_signature(),
                     input_example=(example, {"max_new_tokens": 2} if task == "causal-lm" else {}))


class CompressedPredictor:
    """Sequence classification (class names and probabilities) or text generation with a compressed checkpoint."""

    def __init__(self, checkpoint: str | Path) -> None:
        import importlib.util

        import torch

        if importlib.util.find_spec("vtrans") is None:
            raise ImportError("this model needs vtrans installed (pip install vtrans): its checkpoint loads with the "
                              "installed vtrans's classes, never with code from the artifact store")
        from vtrans.checkpoint import infer_task, load_pretrained, load_tokenizer, read_config

        self.checkpoint = str(checkpoint)
        self.task = "causal-lm" if infer_task(read_config(self.checkpoint)) == "causal-lm" else "seq-cls"
        self.model = load_pretrained(self.checkpoint, task=self.task, dtype=torch.float32).eval()
        self.tokenizer = load_tokenizer(self.checkpoint)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        names = getattr(self.model.config, "id2label", None) or {}
        self.labels = [str(names.get(i, i)) for i in range(self.model.config.num_labels)] \
            if self.task == "seq-cls" else []

    def get_raw_model(self) -> CompressedPredictor:
        """What ``PyFuncModel.get_raw_model()`` returns: this object (``.model``, ``.tokenizer``, ``.checkpoint``)."""
        return self

    def predict(self, model_input, params=None):
        import pandas as pd
        import torch

        params = {**PARAMS, **(params or {})}
        texts = _texts(model_input)
        batch_size = int(params["batch_size"])
        rows = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            if self.task == "seq-cls":
                enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=int(params["max_length"]),
                                     return_tensors="pt")
                with torch.inference_mode():
                    probs = self.model(**enc).logits.float().softmax(-1)  # (batch, labels)
                for p in probs:
                    rows.append({"label": self.labels[int(p.argmax())], "score": float(p.max()),
                                 "probabilities": p.tolist()})
            else:
                self.tokenizer.padding_side = "left"
                enc = self.tokenizer(chunk, padding=True, return_tensors="pt")
                with torch.inference_mode():
                    out = self.model.generate(**enc, max_new_tokens=int(params["max_new_tokens"]), do_sample=False,
                                              pad_token_id=self.tokenizer.pad_token_id)
                new = out[:, enc["input_ids"].shape[1]:]
                rows += [{"generated_text": t} for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return pd.DataFrame(rows)


def _load_pyfunc(path: str, model_config=None) -> CompressedPredictor:
    """MLflow's pyfunc entry point (``loader_module``): ``path`` is the logged model's folder."""
    return CompressedPredictor(Path(path) / MODEL_FOLDER)
