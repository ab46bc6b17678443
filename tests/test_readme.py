"""The README's user example runs as written, and its error example says what it shows."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import FAST_ARGS, cli, plain_args

README = Path(__file__).resolve().parents[1] / "README.md"


def example(marker: str = "def build():") -> str:
    """The README's first Python block holding ``marker``."""
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return next(b for b in blocks if marker in b and "def build():" in b)


@pytest.fixture
def mymodel(workdir, monkeypatch):
    (workdir / "mymodel.py").write_text(example())
    monkeypatch.syspath_prepend(str(workdir))
    yield workdir
    sys.modules.pop("mymodel", None)


def test_readme_example_runs_a_study(mymodel):
    result = cli("run", "--model", "mymodel:build", "--trials", "1", *FAST_ARGS, *plain_args(),
                 "--baseline-steps", "60")
    assert result.code == 0, result.err
    assert "Study 'mymodel'" in result.out


def test_readme_error_example_is_what_a_user_sees(mymodel):
    shown = re.search(r"\$ advisor run --model mymodel:missing\n(.*)\n", README.read_text()).group(1)
    result = cli("run", "--model", "mymodel:missing")
    assert result.code == 2
    assert result.err.strip() == shown


@pytest.mark.slow  # a full study of a transformer: minutes on 2 cores
def test_readme_hugging_face_example_runs_a_study_with_its_conventions(workdir, monkeypatch):
    pytest.importorskip("transformers")
    (workdir / "hfmodel.py").write_text(example("BertForSequenceClassification"))
    monkeypatch.syspath_prepend(str(workdir))
    try:
        result = cli("run", "--model", "hfmodel:build", "--trials", "1", *FAST_ARGS, *plain_args())
    finally:
        sys.modules.pop("hfmodel", None)
    assert result.code == 0, result.err
    assert "Study 'hf-bert'" in result.out
    assert "max_tokens" in result.out or "tokens=" in result.out  # the mask made it variable-length
