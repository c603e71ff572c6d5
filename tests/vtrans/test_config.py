"""Config validation: every bad value is a typed error naming the key and the value."""

from __future__ import annotations

import pytest

import vtrans
from vtrans import Budget, ConfigError, VIBConfig


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"params": 0.0}, "budget.params must be a fraction in (0, 1]"),
    ({"params": 1.5}, "1.5"),
    ({"params": -3}, "-3"),
    ({"flops": float("nan")}, "budget.flops"),
    ({"params": 0.5, "flops": 0.4}, "exactly one of params, flops or latency"),
    ({}, "exactly one"),
    ({"params": 0.5, "scope": "layers"}, "budget.scope must be one of ['blocks', 'total'], got 'layers'"),
    ({"flops": 0.5, "seq_len": 0}, "budget.seq_len"),
    ({"params": "0.5"}, "'0.5'"),
    ({"params": True}, "True"),
])
def test_bad_budgets(kwargs, needle) -> None:
    with pytest.raises(ConfigError) as info:
        Budget(**kwargs)
    assert needle in str(info.value)
    assert isinstance(info.value, vtrans.VtransError) and isinstance(info.value, ValueError)


def test_budget_parse() -> None:
    assert Budget.parse("params=0.5") == Budget(params=0.5)
    assert Budget.parse("flops=0.4", seq_len=64, scope="total") == Budget(flops=0.4, seq_len=64, scope="total")
    assert Budget.parse("params=5000000").value == 5_000_000
    assert Budget.parse("params=1").value == 1.0
    with pytest.raises(ConfigError, match="exactly one"):
        Budget.parse("params=0.5,flops=0.4")
    with pytest.raises(ConfigError, match="'half'"):
        Budget.parse("params=half")
    with pytest.raises(ConfigError, match="'size=0.5'"):
        Budget.parse("size=0.5")


def test_budget_target() -> None:
    assert Budget(params=0.5).target(1000) == 500
    assert Budget(params=300).target(1000) == 300
    assert Budget(flops=0.25, seq_len=64).describe() == "flops=0.25 (blocks, seq_len=64)"


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"structures": ("hidden", "layers")}, "unknown structure 'layers'"),
    ({"structures": ("heads", "heads")}, "twice"),
    ({"kl_weight": -1.0}, "vib.kl_weight must be >= 0, got -1.0"),
    ({"keep_sharpness": 0.0}, "vib.keep_sharpness"),
    ({"kl_multipliers": {"head": 2.0}}, "unknown structure 'head'"),
    ({"kl_multipliers": {"heads": "x"}}, "vib.kl_multipliers.heads"),
    ({"threshold": float("inf")}, "vib.threshold"),
])
def test_bad_vib_configs(kwargs, needle) -> None:
    with pytest.raises(ConfigError) as info:
        VIBConfig(**kwargs)
    assert needle in str(info.value)


def test_vib_config_merges_multipliers() -> None:
    c = VIBConfig(kl_multipliers={"hidden": 4.0})
    assert c.kl_multipliers == {"hidden": 4.0, "heads": 1.0, "neurons": 1.0, "mha": 1.0, "ffn": 1.0}
