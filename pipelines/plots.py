"""Figures logged to MLflow: the per-layer structure a compressed model kept."""

from __future__ import annotations

from pathlib import Path


def plot_layers(report: dict, dense_heads: int, dense_ffn: int, path: str | Path, title: str = "") -> Path:
    """Bar charts of kept attention heads and FFN neurons per layer (removed blocks at 0) against the dense widths,
    from a ``compression.json`` record; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    x = list(range(len(layers)))
    fig, (ax_h, ax_f) = plt.subplots(1, 2, figsize=(max(8.0, 0.35 * len(x) + 4), 3.4))
    ax_h.bar(x, [layer["heads"] for layer in layers], color="tab:blue")
    ax_h.axhline(dense_heads, color="grey", ls="--", lw=1, label=f"dense ({dense_heads})")
    ax_h.set(xlabel="layer", ylabel="kept heads", ylim=(0, dense_heads * 1.1))
    ax_f.bar(x, [layer["ffn_neurons"] for layer in layers], color="tab:orange")
    ax_f.axhline(dense_ffn, color="grey", ls="--", lw=1, label=f"dense ({dense_ffn})")
    ax_f.set(xlabel="layer", ylabel="kept FFN neurons", ylim=(0, dense_ffn * 1.1))
    for ax in (ax_h, ax_f):
        ax.legend(loc="lower right", fontsize=8)
    hidden = report.get("hidden_size", {})
    c, d = report["compressed"], report["dense"]
    fig.suptitle(title or f"hidden {hidden.get('kept')}/{hidden.get('dense')}, block params "
                 f"{c['params_blocks'] / d['params_blocks']:.3f} of dense", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
