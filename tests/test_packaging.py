"""Set-up and packaging: the README's two commands, CI, the dependency pins, the docs links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "the README must open with a bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    first_block = text.index("```bash")
    assert "```" not in text[:first_block], "the set-up commands must be the README's first code"
    demo, tests = readme_commands()
    assert "pip install" in demo and "lightning-shrink demo" in demo
    assert "pip install" in tests and "pytest" in tests
    for command in (demo, tests):
        # A CPU machine must not pull a CUDA torch: torch is pinned to the build on disk.
        assert '"torch==2.13.0"' in command


def test_ci_runs_the_readme_test_command_and_nothing_less():
    ci = (ROOT / ".ci" / "run").read_text()
    _, tests = readme_commands()
    assert tests in ci.splitlines()
    assert "-m " not in tests.split("pytest", 1)[1] and "-k " not in tests, "CI must run the slow tests too"


def test_dependencies_exclude_the_compromised_lightning_releases():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lightning = next(d for d in project["dependencies"] if d.startswith("lightning"))
    assert "!=2.6.2" in lightning and "!=2.6.3" in lightning
    names = {re.split(r"[<>=!\[ ;]", d)[0] for d in project["dependencies"]}
    assert {"lightning", "torch", "transformers", "torchmetrics", "pluggy"} <= names
    assert "opacus" in " ".join(project["optional-dependencies"]["privacy"])
    assert project["scripts"]["lightning-shrink"] == "lightning_shrink.cli:main"


def test_docs_links_in_readme_exist():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(((?:docs|examples)/[^)#]+)\)", text):
        assert (ROOT / target).exists(), f"README links to missing {target}"


def test_lightning_is_bounded_to_the_versions_the_suite_runs_against():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    from lightning_shrink.lightning.compat import TESTED_LIGHTNING

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirement = Requirement(next(d for d in project["dependencies"] if d.startswith("lightning")))
    assert any(spec.operator in ("<", "<=") for spec in requirement.specifier), "no upper bound on lightning"
    assert version("lightning") in TESTED_LIGHTNING, (
        "the suite runs against a Lightning not in TESTED_LIGHTNING"
    )
    for tested in TESTED_LIGHTNING:
        assert requirement.specifier.contains(tested)
    assert not requirement.specifier.contains("2.6.2") and not requirement.specifier.contains("2.6.3")
    assert not requirement.specifier.contains("2.7.0")
