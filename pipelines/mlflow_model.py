"""The MLflow pyfunc of a compressed model ("models from code": MLflow copies this file into the logged model).

Loading needs vtrans installed where the model is loaded: the checkpoint in the model's ``checkpoint`` artifact loads
through :mod:`vtrans.checkpoint` with the installed vtrans's classes, never with code stored in the artifact store
(the ``modeling_vtrans.py`` beside the weights is not run; an ``auto_map`` naming other code is refused). MLflow
itself runs this file from the artifact store on ``mlflow.pyfunc.load_model``, by design of the pyfunc format: load
a pyfunc only from a store you trust, or load just its checkpoint with :func:`pipelines.registry.load_checkpoint`.

```python
model = mlflow.pyfunc.load_model("models:/vtrans-minilm@champion")
model.predict(["a gripping film", "dull"])                   # seq-cls: label, score, probabilities
model.predict(["Once upon a time"], params={"max_new_tokens": 20})    # causal-lm: generated_text
model.predict(pd.DataFrame({"text": [...]}))                 # or a DataFrame: its ``text`` column (or only column)
path = model.unwrap_python_model().checkpoint                          # the HF directory (from_pretrained)
```
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

CHECKPOINT = "checkpoint"


def _texts(model_input) -> list[str]:
    if hasattr(model_input, "columns"):  # a DataFrame: the ``text`` column, else the first one
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[column].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


class CompressedModel(PythonModel):
    """Sequence classification (labels and class probabilities) or text generation with a compressed checkpoint."""

    def load_context(self, context) -> None:
        import importlib.util

        import torch

        if importlib.util.find_spec("vtrans") is None:
            raise ImportError("this model needs vtrans installed (pip install vtrans): its checkpoint loads with the "
                              "installed vtrans's classes, never with code from the artifact store")
        from vtrans.checkpoint import infer_task, load_pretrained, load_tokenizer, read_config

        self.checkpoint = context.artifacts[CHECKPOINT]
        self.task = "causal-lm" if infer_task(read_config(self.checkpoint)) == "causal-lm" else "seq-cls"
        self.model = load_pretrained(self.checkpoint, task=self.task, dtype=torch.float32).eval()
        self.tokenizer = load_tokenizer(self.checkpoint)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        params = dict(params or {})
        texts = _texts(model_input)
        batch_size = int(params.get("batch_size", 32))
        rows = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            if self.task == "seq-cls":
                enc = self.tokenizer(chunk, padding=True, truncation=True,
                                     max_length=int(params.get("max_length", 128)), return_tensors="pt")
                with torch.inference_mode():
                    probs = self.model(**enc).logits.float().softmax(-1)  # (batch, labels)
                for p in probs:
                    rows.append({"label": int(p.argmax()), "score": float(p.max()), "probabilities": p.tolist()})
            else:
                self.tokenizer.padding_side = "left"
                enc = self.tokenizer(chunk, padding=True, return_tensors="pt")
                with torch.inference_mode():
                    out = self.model.generate(**enc, max_new_tokens=int(params.get("max_new_tokens", 32)),
                                              do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
                new = out[:, enc["input_ids"].shape[1]:]
                rows += [{"generated_text": t} for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return pd.DataFrame(rows)


mlflow.models.set_model(CompressedModel())
