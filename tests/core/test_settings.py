"""OPBRIDGE_* settings: parsing, precedence, and errors that list the valid names."""
import pytest
import torch

import opbridge
from opbridge.core import settings
from opbridge.core.registry import decide


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("OPBRIDGE_BACKEND", raising=False)
    choice, source = settings.backend_choice()
    assert choice.default == "auto" and dict(choice.per_op) == {} and source == "OPBRIDGE_BACKEND"


def test_per_op_entries(monkeypatch):
    monkeypatch.setenv("OPBRIDGE_BACKEND", "triton, mhc_pre=reference,moe=reference")
    choice, _ = settings.backend_choice()
    assert choice.default == "triton"
    assert choice.for_op("mhc_pre") == "reference" and choice.for_op("moe") == "reference"
    assert choice.for_op("mhc_post") == "triton"


@pytest.mark.parametrize("raw, fragment", [
    ("nonsense", "unknown backend 'nonsense'"),
    ("reference,not_an_op=triton", "unknown op 'not_an_op'"),
    ("reference,moe=cuda", "unknown backend 'cuda' for op 'moe'"),
    ("moe=reference,triton", "must come first"),
])
def test_bad_backend_setting(monkeypatch, raw, fragment):
    monkeypatch.setenv("OPBRIDGE_BACKEND", raw)
    with pytest.raises(opbridge.ConfigError, match=fragment) as e:
        settings.backend_choice()
    if "unknown backend" in fragment:
        assert "reference, triton, ascend" in str(e.value)  # lists the valid names
    if "unknown op" in fragment:
        assert "mhc_pre" in str(e.value)


def test_first_op_call_fails_with_nonsense_backend(monkeypatch):
    monkeypatch.setenv("OPBRIDGE_BACKEND", "nonsense")
    with pytest.raises(opbridge.ConfigError) as e:
        opbridge.sinkhorn(torch.randn(4, 4))
    for name in ("auto", "reference", "triton", "ascend"):
        assert name in str(e.value)


def test_use_backend_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv("OPBRIDGE_BACKEND", "triton")
    cpu = torch.device("cpu")
    assert decide("mhc_pre", cpu).backend == "triton"
    with opbridge.use_backend("reference"):
        d = decide("mhc_pre", cpu)
        assert (d.backend, d.source) == ("reference", "use_backend")
        with opbridge.use_backend("triton", mhc_pre="reference"):
            assert decide("mhc_pre", cpu).backend == "reference"
            assert decide("mhc_post", cpu).backend == "triton"
        assert decide("mhc_post", cpu).backend == "reference"
    assert decide("mhc_pre", cpu).backend == "triton"


def test_use_backend_rejects_unknown_names():
    with pytest.raises(opbridge.ConfigError, match="unknown backend"):
        with opbridge.use_backend("cuda"):
            pass
    with pytest.raises(opbridge.ConfigError, match="unknown op"):
        with opbridge.use_backend("reference", not_an_op="triton"):
            pass


def test_use_backend_is_context_local():
    import contextvars

    seen = []
    with opbridge.use_backend("triton"):
        ctx = contextvars.Context()  # a fresh context (as a new thread would have) does not inherit it
        ctx.run(lambda: seen.append(settings.backend_choice()[0].default))
    assert seen == ["auto"]


@pytest.mark.parametrize("raw, expected", [("0", False), ("1", True), ("true", True), ("off", False)])
def test_validate_flag(monkeypatch, raw, expected):
    monkeypatch.setenv("OPBRIDGE_VALIDATE", raw)
    assert settings.validate() is expected


def test_bad_flags(monkeypatch):
    monkeypatch.setenv("OPBRIDGE_VALIDATE", "maybe")
    with pytest.raises(opbridge.ConfigError, match="OPBRIDGE_VALIDATE"):
        settings.validate()
    monkeypatch.setenv("OPBRIDGE_FALLBACK", "cpu")
    with pytest.raises(opbridge.ConfigError, match="none, reference"):
        settings.fallback()


def test_every_setting_documented():
    names = {s.env for s in settings.SETTINGS}
    assert names == {"OPBRIDGE_BACKEND", "OPBRIDGE_FALLBACK", "OPBRIDGE_VALIDATE"}
    assert all(len(s.doc) > 20 for s in settings.SETTINGS)
