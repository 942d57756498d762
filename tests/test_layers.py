"""The package's layers point down only: every import of a diffswap_igfi module, at module or
function level, goes to the importer's own layer or a lower one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffswap_igfi"

# From the ground up (DESIGN.md). The package root holds only the version and the errors.
LAYERS = [
    ["", "errors"],
    ["io", "faces", "training"],
    ["geometry", "provenance"],
    ["conditions"],
    ["sfi", "data", "adapters", "jr", "losses"],
    ["engines", "convert"],  # convert: foreign checkpoints into our pipeline folders
    ["swapper"],
    ["video"],
    ["eval", "ui"],
    ["cli"],
    ["__main__"],
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it sits (module
    level, functions, classes, conditionals). name: the file's module name."""
    name = name or _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # ``from diffswap_igfi import sfi`` imports a subpackage (``__version__`` is a name)
            if module == "diffswap_igfi":
                found += [(node.lineno, f"diffswap_igfi.{a.name}") for a in node.names
                          if not a.name.startswith("__")]
    return found


def _layer(module: str) -> str:
    """The top-level part of a diffswap_igfi module name ('' for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(layer: str, where: str) -> int:
    if layer not in RANK:
        pytest.fail(f"{where}: diffswap_igfi.{layer} has no layer: add it to LAYERS in "
                    f"tests/test_layers.py (and to DESIGN.md)")
    return RANK[layer]


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        own = _rank(_layer(importer), importer)
        for line, module in _imports(path):
            if module != "diffswap_igfi" and not module.startswith("diffswap_igfi."):
                continue
            target = _layer(module)
            if target == "" and module == "diffswap_igfi" and importer.count(".") == 0:
                continue
            if _rank(target, f"{importer}:{line}") > own:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} {importer} "
                                f"(layer {_layer(importer) or 'root'}) imports {module} "
                                f"(layer {target})")
    return problems


def test_no_module_imports_a_higher_layer():
    problems = upward_imports()
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n"
                     "def f():\n"
                     "    from ..engines import geometric\n"
                     "class C:\n"
                     "    def g(self):\n"
                     "        import diffswap_igfi.eval.run\n"
                     "        from diffswap_igfi import cli\n")
    found = [module for _, module in _imports(probe, "diffswap_igfi.sfi.probe")]
    assert found == ["os", "diffswap_igfi.engines", "diffswap_igfi.eval.run", "diffswap_igfi",
                     "diffswap_igfi.cli"]
    assert [_layer(m) for m in found[1:]] == ["engines", "eval", "", "cli"]


def test_no_sfi_module_builds_a_face_detector():
    """The SFI stage takes detected faces; only front ends detect."""
    offenders = [str(p.relative_to(PACKAGE.parent)) for p in sorted((PACKAGE / "sfi").rglob("*.py"))
                 if "FaceDetector" in p.read_text()]
    assert not offenders, f"these SFI modules mention FaceDetector: {offenders}"
