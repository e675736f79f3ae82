"""Registration with stock mergekit: the .pth hook, its off switch, register(), the wheel."""

from __future__ import annotations

import filecmp
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_state, run_mergekit

import mergekit_safemerge

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict | None = None, args: tuple[str, ...] = (), cwd=None) -> str:
    result = subprocess.run(
        [sys.executable, *args, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_fresh_interpreter_sees_safemerge():
    out = _python(
        "from mergekit.merge_methods import get, registered_methods\n"
        "m = get('safemerge'); print(m.spec.pretty_name, len(registered_methods()))"
    )
    assert out.startswith("SafeMERGE ")


def test_startup_imports_neither_torch_nor_mergekit():
    out = _python(
        "import sys\n"
        "print('mergekit_safemerge._autoload' in sys.modules,"
        " any(m == 'torch' or m.startswith('mergekit.') or m == 'mergekit' for m in sys.modules))"
    )
    assert out == "True False"


@pytest.mark.slow
def test_off_switch_and_explicit_register():
    code = (
        "from mergekit.merge_methods import get\n"
        "try:\n    get('safemerge'); print('registered')\n"
        "except RuntimeError: print('absent')\n"
    )
    assert _python(code, env={"MERGEKIT_SAFEMERGE_AUTOLOAD": "0"}) == "absent"
    assert _python(code, env={"MERGEKIT_SAFEMERGE_AUTOLOAD": "1"}) == "registered"
    explicit = (
        "import mergekit_safemerge; mergekit_safemerge.register(); mergekit_safemerge.register()\n"
    )
    assert _python(explicit + code, env={"MERGEKIT_SAFEMERGE_AUTOLOAD": "0"}) == "registered"
    # python -S skips .pth files; register() alone must be enough
    assert _python(
        explicit + code, args=("-S",), env={"PYTHONPATH": os.pathsep.join(sys.path)}
    ) == ("registered")


@pytest.mark.slow
def test_registry_otherwise_unchanged():
    code = (
        "from mergekit.merge_methods import registered_methods as r\n"
        "print(sorted(m.spec.name for m in r()))"
    )
    with_hook = eval(_python(code))
    without = eval(_python(code, env={"MERGEKIT_SAFEMERGE_AUTOLOAD": "0"}))
    assert sorted(set(with_hook) - set(without)) == ["safemerge"]
    assert set(without) <= set(with_hook)


@pytest.mark.slow
def test_importing_our_modules_first_still_registers():
    """Whichever of our modules is imported first in a fresh interpreter (those that import
    mergekit themselves), the hook registers the method and wraps run_merge, with no warning."""
    for module in (
        "binding.method", "binding.registration", "binding.config", "binding.pipeline",
        "binding.executor", "binding.wrap", "cli",
    ):  # fmt: skip
        out = _python(
            f"import mergekit_safemerge.{module}\n"
            "import mergekit.merge\n"
            "from mergekit.merge_methods import get\n"
            "wrapped = getattr(mergekit.merge.run_merge, '__safemerge_wrapped__', False)\n"
            "print(get('safemerge').spec.name, wrapped)",
            args=("-W", "error::RuntimeWarning"),
        )
        assert out == "safemerge True", module


def test_broken_plugin_warns_and_mergekit_still_works(tmp_path):
    """A failing registration must never break mergekit or start-up."""
    fake = tmp_path / "mergekit_safemerge"
    fake.mkdir()
    src = ROOT / "mergekit_safemerge"
    for name in ("__init__.py", "_autoload.py"):
        (fake / name).write_text((src / name).read_text())
    (fake / "registration.py").write_text("raise ImportError('simulated breakage')\n")
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "import warnings; warnings.simplefilter('always')\n"
        "import mergekit_safemerge._autoload\n"
        "from mergekit.merge_methods import get; print(get('linear').spec.name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[1:])},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "linear"
    assert "could not hook into mergekit.merge_methods" in result.stderr


@pytest.mark.slow
def test_other_methods_are_byte_identical_with_and_without_the_hook(tiny_roles, tmp_path):
    tiny = tiny_roles("llama")
    config = tmp_path / "linear.yml"
    config.write_text(
        "merge_method: linear\n"
        "models:\n"
        f"  - model: {tiny.paths['finetuned']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {tiny.paths['safety']}\n    parameters: {{weight: 0.3}}\n"
        "dtype: float32\n"
    )
    outs = []
    for flag in ("1", "0"):
        out = tmp_path / f"hook-{flag}" / "out"  # same folder name: the model card names it
        result = run_mergekit(str(config), out, env={"MERGEKIT_SAFEMERGE_AUTOLOAD": flag})
        assert result.returncode == 0, result.stderr
        assert "SafeMERGE" not in result.stdout
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    assert "safemerge_report.json" not in names
    for name in names:
        if name == "README.md":
            # mergekit's card lists the models in the iteration order of a set of pydantic
            # objects, which varies between processes: compare its lines as a multiset.
            lines = [sorted((out / name).read_text().splitlines()) for out in outs]
            assert lines[0] == lines[1]
            continue
        assert filecmp.cmp(outs[0] / name, outs[1] / name, shallow=False), name
    assert load_state(outs[0]).keys() == load_state(outs[1]).keys()


@pytest.mark.slow
def test_regular_wheel_install_registers(tmp_path):
    """The wheel carries the .pth at its root; a site dir holding the wheel registers on start."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = glob.glob(str(wheel_dir / "*.whl"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "mergekit_safemerge.pth").read_text().strip() == (
        "import mergekit_safemerge._autoload"
    )
    venv_site = next(p for p in sys.path if p.endswith("site-packages"))
    out = _python(
        "import site\n"
        f"site.addsitedir({str(target)!r})\n"
        f"site.addsitedir({venv_site!r})\n"
        "import mergekit_safemerge\n"
        "from mergekit.merge_methods import get\n"
        "print(get('safemerge').spec.name, mergekit_safemerge.__file__.startswith("
        f"{str(target)!r}))",
        args=("-S",),
        cwd=tmp_path,  # not the checkout, whose package folder would shadow the wheel's
    )
    assert out == "safemerge True"


def _package_modules(folder: str) -> list[str]:
    root = Path(mergekit_safemerge.__file__).parent
    return sorted(
        f"mergekit_safemerge.{folder}.{p.stem}" if p.stem != "__init__" else
        f"mergekit_safemerge.{folder}"
        for p in (root / folder).glob("*.py")
    )  # fmt: skip


def _imported_after(modules: list[str], check: str) -> str:
    imports = "; ".join(f"import {m}" for m in modules)
    return _python(
        f"import sys; {imports}\nprint({check})", env={"MERGEKIT_SAFEMERGE_AUTOLOAD": "0"}
    )


def test_pure_core_imports_no_mergekit():
    """Every module of core/ imports torch only: no mergekit (its DARE/TIES blocks load when
    such a rule runs), nothing of the package above the core."""
    modules = _package_modules("core")
    assert "mergekit_safemerge.core.rule" in modules
    out = _imported_after(
        [*modules, "mergekit_safemerge.outputs.folder", "mergekit_safemerge.errors"],
        "sorted(m for m in sys.modules if m == 'mergekit' or m.startswith(("
        "'mergekit.', 'mergekit_safemerge.binding', 'mergekit_safemerge.lora', "
        "'mergekit_safemerge.cli', 'mergekit_safemerge.eval')))",
    )
    assert out == "[]"


def test_binding_imports_no_edge():
    """The binding (method, passes, checks, pipeline, wrappers) never imports the edges: the
    CLI (and its option declarations), evaluation, plotting, the scan's outputs, the demo models."""
    out = _imported_after(
        _package_modules("binding"),
        "sorted(m for m in sys.modules if m.startswith(('mergekit_safemerge.cli', "
        "'mergekit_safemerge.mergekit_options', 'mergekit_safemerge.eval', "
        "'mergekit_safemerge.outputs.scan', 'mergekit_safemerge.demo', 'matplotlib')))",
    )
    assert out == "[]"


@pytest.mark.slow
def test_importing_our_modules_has_no_side_effect_on_mergekit():
    """With the hook off, importing the method module registers nothing and wraps nothing."""
    out = _python(
        "import mergekit_safemerge.binding.method, mergekit_safemerge.binding.pipeline\n"
        "import mergekit.merge\n"
        "from mergekit.merge_methods import registered_methods\n"
        "print('safemerge' in {m.spec.name for m in registered_methods()},"
        " hasattr(mergekit.merge.run_merge, '__safemerge_wrapped__'))",
        env={"MERGEKIT_SAFEMERGE_AUTOLOAD": "0"},
    )
    assert out == "False False"
