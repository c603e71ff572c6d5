"""Loading stock checkpoints in a fresh process where ``import vtrans`` fails (tests of --uniform and export)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# The child: vtrans cannot be imported; each checkpoint loads with the stock Auto class of its task, runs the saved
# input ids and (causal LMs) generates greedily; outputs go back as a torch file.
_CHILD = textwrap.dedent("""
    import sys
    sys.modules["vtrans"] = None  # `import vtrans` raises ImportError in this process
    import json
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    try:
        import vtrans  # noqa: F401
        raise SystemExit("vtrans was importable")
    except ImportError:
        pass
    auto = {"base": AutoModel, "seq-cls": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}
    torch.set_num_threads(1)
    for case in json.loads(sys.argv[1]):
        model = auto[case["task"]].from_pretrained(case["dir"]).eval()
        ids = torch.load(case["dir"] + "/ids.pt")
        with torch.no_grad():
            out = model(input_ids=ids)
        res = {"out": out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state,
               "class": type(model).__name__, "module": type(model).__module__,
               "model_type": model.config.model_type}
        if case["task"] == "causal-lm":
            res["gen"] = model.generate(ids[:1], max_new_tokens=case.get("new_tokens", 6), do_sample=False,
                                        pad_token_id=0)
        if case.get("prompt") is not None:  # the checkpoint holds a tokenizer: transformers' own pipeline(...)
            from transformers import pipeline
            pipe = pipeline("text-generation", model=case["dir"])
            out = pipe(case["prompt"], max_new_tokens=case.get("new_tokens", 6), do_sample=False,
                       return_full_text=False)
            res["pipeline"] = {"text": out[0]["generated_text"], "class": type(pipe.model).__name__}
        torch.save(res, case["dir"] + "/child.pt")
    print("ok")
""")


def task_of(model) -> str:
    """``causal-lm``, ``seq-cls`` or ``base``."""
    name = type(model).__name__
    return "causal-lm" if hasattr(model, "lm_head") else "seq-cls" if "Sequence" in name else "base"


def load_without_vtrans(cases: list[dict], timeout: int = 300) -> dict[str, dict]:
    """Run every ``{"dir", "task"}`` case in one child process without vtrans; its results by directory. Each
    directory holds ``ids.pt`` (the input ids) written by the caller; a case with a ``prompt`` (and a tokenizer in its
    directory) also runs ``transformers.pipeline("text-generation", model=dir)`` on it (``res["pipeline"]``)."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True,
                          timeout=timeout, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {c["dir"]: torch.load(Path(c["dir"]) / "child.pt") for c in cases}


def assert_stock_files(directory: Path, model_type: str) -> None:
    """A stock checkpoint: the stock ``model_type``, no ``auto_map``, no Python file."""
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == model_type
    assert "auto_map" not in config and "vtrans" not in config
    assert not list(directory.rglob("*.py"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
