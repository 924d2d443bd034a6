"""The tree is the architecture: import rules between the rooms, checked on every import statement of every product
module (function-level lazy imports included), and a wheel that holds every product module.

Rules: ``common/`` imports no role and nothing of ``scripts/``; ``broker/`` imports no torch, diffusers, transformers
or peft and no other role; ``actor/`` never imports ``learner/``; ``scorer/`` imports neither ``actor/`` nor
``learner/``; no import circle between the packages.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("actor", "broker", "common", "learner", "scorer", "scripts")  # top-level folder = editrl.<folder>
ROLES = ("actor", "broker", "learner", "scorer")
MODEL_LIBS = ("torch", "diffusers", "transformers", "peft")
MAX_MODULE_LINES = 500


def product_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every product module (``editrl.common.families.flow`` -> common/families/flow.py)."""
    out = {}
    for room in ROOMS:
        for path in sorted((root / room).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join(("editrl", *parts))] = path
    return out


def imported_modules(name: str, path: Path) -> list[tuple[str, int]]:
    """(absolute module, line) of every import statement in ``path``, at any depth (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from editrl.scripts import bon` imports the module editrl.scripts.bon
            found += [(f"{base}.{alias.name}" if base in ("editrl", *[f"editrl.{r}" for r in ROOMS]) else base,
                       node.lineno) for alias in node.names]  # fmt: skip
    return found


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "editrl" and len(parts) > 1 and parts[1] in ROOMS else None


def violations(modules: dict[str, Path]) -> list[str]:
    """Every import that breaks a rule, and every circle between rooms."""
    bad, edges = [], set()
    for name, path in modules.items():
        here = room_of(name)
        for target, line in imported_modules(name, path):
            there, top = room_of(target), target.split(".")[0]
            where = f"{path.relative_to(path.parents[len(name.split('.')) - 2])}:{line} imports {target}"
            if there and there != here:
                edges.add((here, there))
            if here == "common" and there in (*ROLES, "scripts"):
                bad.append(f"{where}: common/ is shared ground and imports no role and nothing of scripts/")
            if here == "broker" and (top in MODEL_LIBS or (there and there not in ("broker", "common"))):
                bad.append(f"{where}: broker/ knows no model and no other role")
            if here == "actor" and there == "learner":
                bad.append(f"{where}: actor/ never imports learner/")
            if here == "scorer" and there in ("actor", "learner"):
                bad.append(f"{where}: scorer/ imports neither actor/ nor learner/")
    bad += [f"import circle between {a}/ and {b}/" for a, b in sorted(edges) if a < b and (b, a) in edges]
    return bad


def test_every_import_keeps_the_room_rules() -> None:
    modules = product_modules()
    assert len(modules) > 50 and "editrl.common.families.flux_kontext" in modules
    assert violations(modules) == []


def test_the_rules_catch_a_bad_import(tmp_path: Path) -> None:
    """A temporary module in common/ that imports a role (inside a function, as the lazy imports do), and one in
    broker/ that imports torch: both reported, next to the real tree."""
    (tmp_path / "common").mkdir()
    (tmp_path / "broker").mkdir()
    lazy = tmp_path / "common" / "sneaky.py"
    lazy.write_text("def run():\n    from editrl.actor.loop import Actor\n    return Actor\n")
    heavy = tmp_path / "broker" / "heavy.py"
    heavy.write_text("import torch\n")
    modules = {**product_modules(), "editrl.common.sneaky": lazy, "editrl.broker.heavy": heavy}
    found = violations(modules)
    assert any("sneaky.py:2 imports editrl.actor.loop" in v for v in found), found
    assert any("heavy.py:1 imports torch" in v for v in found), found
    circle = tmp_path / "common" / "circle.py"
    circle.write_text("from editrl.scripts import cli\n")  # scripts/ imports common/: now a circle too
    assert any(
        "import circle between common/ and scripts/" in v
        for v in violations({**modules, "editrl.common.circle": circle})
    )


def test_the_broker_process_imports_no_torch() -> None:
    code = "import sys, editrl.broker.main, editrl.broker.server; print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))"  # noqa: E501
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_product_module_is_at_most_500_lines() -> None:
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in product_modules().values()}
    long = {f: n for f, n in lines.items() if n > MAX_MODULE_LINES}
    assert long == {}, f"split these by responsibility: {long}"


def test_every_package_says_what_lives_in_it() -> None:
    for name, path in product_modules().items():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc) > 40, f"{name}: its __init__.py should say what lives in this room"


def test_the_wheel_holds_every_product_module(tmp_path: Path) -> None:
    """A non-editable install must be able to import everything: build the wheel from a copy of the tree."""
    src = tmp_path / "src"
    src.mkdir()
    for room in ROOMS:
        shutil.copytree(ROOT / room, src / room, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", f"{src}/", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("editrl-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"editrl/{p.relative_to(ROOT)}" for p in product_modules().values()}
    assert expected - inside == set()
