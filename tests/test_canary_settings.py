"""The gateway's canary rule and comparison mix come from the environment; a bad value stops
`loopchat serve` with a one-line message naming it."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from feedback.canary import Rule
from loopchat.commands.serve import serve
from loopchat.settings import Settings, parse_mix
from serve.registry import DEFAULT_COMPARISON_MIX


def test_defaults(monkeypatch, tmp_path):
    for var in ("LOOPCHAT_CANARY_AUTO", "LOOPCHAT_CANARY_MARGIN", "LOOPCHAT_COMPARISON_MIX"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings(data_dir=tmp_path)
    assert settings.canary_rule() == Rule() and Rule().auto is True
    assert settings.comparison_mix() == DEFAULT_COMPARISON_MIX


def test_the_environment_sets_them(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPCHAT_CANARY_AUTO", "0")
    monkeypatch.setenv("LOOPCHAT_CANARY_MIN_ANSWERS", "500")
    monkeypatch.setenv("LOOPCHAT_CANARY_MARGIN", "0.02")
    monkeypatch.setenv("LOOPCHAT_COMPARISON_MIX", "serving=1, base=3")
    settings = Settings(data_dir=tmp_path)
    assert settings.canary_rule() == Rule(min_answers=500, margin=0.02, auto=False)
    assert settings.comparison_mix() == {"serving": 1.0, "base": 3.0}


@pytest.mark.parametrize("raw", ["serving", "latest=1", "serving=-1", "serving=0,base=0", "base=x"])
def test_a_bad_mix_is_refused(raw):
    with pytest.raises(ValueError, match="LOOPCHAT_COMPARISON_MIX"):
        parse_mix(raw)


@pytest.mark.parametrize("var,value", [("LOOPCHAT_CANARY_MARGIN", "lots"), ("LOOPCHAT_CANARY_ALPHA", "1.5"),
                                       ("LOOPCHAT_CANARY_AUTO", "maybe"), ("LOOPCHAT_COMPARISON_MIX", "newest=1")])
def test_serve_refuses_a_bad_value_in_one_line(tmp_path, var, value):
    out = CliRunner().invoke(serve, ["--engine-url", "http://127.0.0.1:9", "--data-dir", str(tmp_path)],
                             env={var: value})
    assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
    assert out.output.startswith("Error: LOOPCHAT_"), out.output
