"""The package as users install it: what the wheel holds, and commands that work without a checkout.

.ci/package installs the built wheel into a fresh environment and runs the commands from
outside the checkout; these tests pin the pieces in one process: the wheel's contents and
what each command does when ``common`` is not imported from a checkout.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from common import resources
from common.teach import page
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The file names in a wheel built from this checkout (no build isolation: seconds, offline)."""
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("densenet_suite-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_the_wheel_holds_every_module_of_the_checkout(wheel_names: set[str]) -> None:
    modules = {
        p.relative_to(ROOT).as_posix()
        for top in ("common", "densenet_torch", "densenet_mxnet", "densenet_jax", "densenet_tf")
        for p in (ROOT / top).rglob("*.py")
        if "__pycache__" not in p.parts and "docs" not in p.relative_to(ROOT).parts
    }
    assert {"common/bench/__init__.py", "common/distributed/launch.py"} <= modules
    assert sorted(modules - wheel_names) == []


def test_the_wheel_holds_what_commands_read(wheel_names: set[str]) -> None:
    data = {
        "common/oracle/golden/small.safetensors",
        "common/oracle/golden/rgb_nonsquare.safetensors",
        "common/teach/static/site.css",
        "common/teach/static/site.js",
        "common/teach/templates/page.html.j2",
        "common/teach/docs/departures.md",
        "common/teach/docs/training_curves.png",
        "common/teach/docs/results/parity_float32.json",
        "common/teach/docs/results/parity_float64.json",
    }
    assert sorted(data - wheel_names) == []
    # docs/ beyond what the site reads stays out of the wheel (it is in the sdist).
    assert not any(n.startswith("common/teach/docs/") and n.endswith("training.md") for n in wheel_names)


def test_the_checkout_is_found_here() -> None:
    assert resources.checkout_root() == ROOT
    assert resources.import_root() == ROOT
    assert (resources.docs_dir() / "departures.md").resolve() == ROOT / "docs" / "departures.md"


def _fake_common(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    (root / "common").mkdir(parents=True)
    monkeypatch.setattr(resources, "_COMMON", root / "common")


def test_an_installed_package_has_no_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_common(monkeypatch, tmp_path / "site-packages")
    assert resources.checkout_root() is None


def test_another_project_is_not_our_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A virtual environment inside someone else's repository: its pyproject.toml is not ours.
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')
    _fake_common(monkeypatch, tmp_path)
    assert resources.checkout_root() is None
    (tmp_path / "pyproject.toml").write_text("not [toml")
    assert resources.checkout_root() is None


def test_children_import_this_checkout_first() -> None:
    env = resources.child_env({"PYTHONPATH": "/elsewhere", "KEEP": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    assert env["KEEP"] == "1"
    assert resources.child_env({})["PYTHONPATH"] == str(ROOT)


def test_children_of_an_installed_package_keep_their_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # site-packages before the standard library could shadow it: an installed suite adds nothing.
    installed = Path(site.getsitepackages()[0]).resolve()
    monkeypatch.setattr(resources, "_COMMON", installed / "common")
    assert resources.child_env({"A": "1"}) == {"A": "1"}
    assert resources.child_env({"PYTHONPATH": "/x"}) == {"PYTHONPATH": "/x"}


def test_the_site_says_it_was_built_without_a_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "checkout_root", lambda: None)
    assert page._commit() == "none: built from the installed package, not from a git checkout"


def test_the_site_says_when_docs_are_missing(tmp_path: Path) -> None:
    out = tmp_path / "site"
    index = page.build_site(out, page.SiteOptions(docs=tmp_path / "nodocs"))
    html = index.read_text(encoding="utf-8")
    assert "departures.md is missing, so the departures are not shown" in html
    assert "training_curves.png is missing" in html


@pytest.mark.parametrize("command", ["notebooks", "golden"])
def test_checkout_commands_refuse_without_one(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(resources, "checkout_root", lambda: None)
    code, out, err = run_cli(capsys, command)
    assert code == 2 and out == ""
    assert "installed package" in err and "--dir" in err and "Traceback" not in err
