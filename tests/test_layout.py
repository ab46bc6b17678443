"""The package's shape: no import cycles, small modules, screens on top, and a knob that is
one config field plus one row of the knobs table."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch

from advisor import export, knobs, report, space
from advisor.errors import AdvisorError
from advisor.knobs import Knob, Knobs
from advisor.techniques.distillation import DistillationConfig
from test_space import CPU_NO_BF16
from workloads import MLP

PACKAGE = Path(__file__).resolve().parent.parent / "advisor"
MAX_LINES = 450
# The screens: only these may import the terminal report.
SCREENS = ("advisor.cli", "advisor.api", "advisor.dashboard")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The advisor modules ``name`` imports anywhere in it (functions included: a lazy import
    that closes a loop is a loop all the same)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(kept + ([node.module] if node.module else []))
            # ``from advisor.study import storage`` imports the module advisor.study.storage.
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in out if m in known and m != name}


def test_no_import_cycles_inside_the_package():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = [*trail[trail.index(name):], name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert len(done) == len(known) > 40


def test_no_module_is_over_450_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_only_the_screens_import_the_terminal_report():
    known = modules()
    importers = sorted(name for name, path in known.items() if "advisor.report" in imports(name, path, known))
    assert importers, "the report is imported by its screens"
    below = [name for name in importers if not name.startswith(SCREENS)]
    assert not below, f"modules below the screens import advisor.report: {below}"


def test_every_knob_of_the_table_reaches_the_space_the_knobs_and_the_file():
    s = space.build(CPU_NO_BF16, MLP(), 16, torch.randn(4, 8))
    stored = s.to_dict()
    for knob in knobs.table():
        assert knob.name in s.values, knob.name
        assert knob.name in Knobs().to_dict()
        assert (knob.name in stored) == (knob.original or s.offers(knob)), knob.name
        assert knob.type is type(knob.default), f"{knob.name}: an exported file holds a {knob.type.__name__}"
    assert [k.column for k in report.knob_columns(stored)] == [
        "precision", "accum", "ckpt", "compile", "lr", "prune", "quant", "kd"]


# -- adding a knob ------------------------------------------------------------------------------------
# What a contributor does to give distillation a warm-up (the teacher joins after a share of
# the fine-tune): a field on the technique's config, and one row in the table. Here both are
# made in the test (a config subclass, a patched table); everything else must follow.

@dataclass(frozen=True)
class WarmDistillationConfig(DistillationConfig):
    warmup: float = 0.0  # share of the fine-tune before the teacher joins

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.warmup <= 0.5:
            raise ValueError(f"distill_warmup must be a number from 0 to 0.5; got {self.warmup!r}")


WARMUP = Knob("distill_warmup", WarmDistillationConfig, "warmup", float, 0.0,
              lambda probe: ((0.0, 0.5, 0.1), []), sample="step", original=False,
              when=lambda values: values["distill_alpha"] > 0, limits=(0.0, 0.5),
              text=lambda k: f"kd-warmup={k.distill_warmup:g}" if k.distill_warmup else "")


@pytest.fixture
def with_warmup(monkeypatch):
    rows = [Knob(**{**k.__dict__, "config": WarmDistillationConfig}) if k.config is DistillationConfig else k
            for k in knobs.KNOBS]
    monkeypatch.setattr(knobs, "KNOBS", (*rows, WARMUP))


def test_a_knob_is_one_config_field_and_one_row(with_warmup):
    s = space.build(CPU_NO_BF16, MLP(), 16, torch.randn(4, 8))
    assert s.distill_warmup == (0.0, 0.5, 0.1) and s.to_dict()["distill_warmup"] == [0.0, 0.5]
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        k = s.suggest(trial)
        # Sampled where it matters (with a teacher), in the config the trial applies.
        assert ("distill_warmup" in trial.params) == (k.distill_alpha > 0)
        assert k.config(WarmDistillationConfig).warmup == k.distill_warmup
        assert Knobs.from_dict(trial.params) == k
        seen.add(k.distill_warmup)
    assert len(seen) > 3
    assert "kd-warmup=0.2" in Knobs(distill_alpha=0.5, distill_warmup=0.2).describe()
    assert s.check_values({"distill_alpha": 0.5, "distill_warmup": 0.3}) == {"distill_alpha": 0.5,
                                                                             "distill_warmup": 0.3}
    with pytest.raises(AdvisorError, match=r"distill_warmup must be between 0 and 0\.5; got 0\.9"):
        s.check_values({"distill_warmup": 0.9})
    with pytest.raises(ValueError, match=r"distill_warmup must be a number from 0 to 0\.5"):
        Knobs(distill_warmup=0.7)


def test_an_exported_file_carries_a_new_knob_and_older_files_still_load(with_warmup, tmp_path):
    from test_export import ALL_KNOBS, exported

    content = exported(tmp_path)
    assert content["knobs"]["distill_warmup"] == 0.0
    content["knobs"]["distill_warmup"] = 0.2
    assert export.from_dict(content).knobs.distill_warmup == 0.2
    del content["knobs"]["distill_warmup"]  # a file written before the knob existed
    assert export.from_dict(content).knobs == Knobs(**ALL_KNOBS)
