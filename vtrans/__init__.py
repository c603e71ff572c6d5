"""vtrans: structured pruning of Hugging Face transformers guided by the Variational Information Bottleneck.

```python
import vtrans
vib = vtrans.attach(model, vtrans.VIBConfig())      # VIB masks on every structure
vib.apply_budget(vtrans.Budget(params=0.5))         # or Budget(flops=0.4, seq_len=128); scope="blocks"|"total"
small = vtrans.compress(vib)                        # physically smaller HF model
vtrans.save_posterior(vib, dir); vtrans.load_posterior(dir).apply_budget(...)   # one training, several budgets
small.save_pretrained(out_dir)
vtrans.count(model, seq_len=128)                    # params/FLOPs, blocks and total
vtrans.kwon_prune(vib, batches, budget)             # baseline: Kwon et al. 2022 Fisher masks (vtrans.fisher)
```
"""

from __future__ import annotations

__version__ = "0.1.0"

from transformers import PreTrainedModel

from vtrans import arch
from vtrans.budget import Counts, Geometry, Keep, Scores, Selection
from vtrans.budget import counts as _counts
from vtrans.checkpoint import register_auto_classes
from vtrans.compress import compress
from vtrans.config import STRUCTURES, Budget, VIBConfig
from vtrans.errors import (
    AssetError,
    BudgetError,
    ConfigError,
    ExportError,
    OutputError,
    UnknownModelError,
    UnsupportedModelError,
    VtransError,
)
from vtrans.fisher import kwon_prune
from vtrans.posterior import load_posterior, save_posterior
from vtrans.scoring import score
from vtrans.vib import VIB, attach

# compressed checkpoints load with these installed classes, never with the modeling file stored beside them
register_auto_classes()


def count(model: PreTrainedModel, seq_len: int = 128) -> Counts:
    """Exact parameters and forward FLOPs (at ``seq_len``) of a dense or vtrans-compressed model, both scopes."""
    adapter = arch.for_model(model)
    return _counts(adapter.geometry(model), adapter.keep(model), seq_len)


__all__ = [
    "STRUCTURES", "VIB", "AssetError", "Budget", "BudgetError", "ConfigError", "Counts", "ExportError", "Geometry",
    "Keep", "OutputError", "Scores", "Selection", "UnknownModelError", "UnsupportedModelError", "VIBConfig",
    "VtransError", "__version__", "arch", "attach", "compress", "count", "kwon_prune", "load_posterior",
    "save_posterior", "score",
]
