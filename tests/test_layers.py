"""plsc's packages import only downwards: every import of every module (lazy ones inside functions too) is
read with ``ast`` and checked against the layer order below."""

from __future__ import annotations

import ast
from pathlib import Path

import plsc

ROOT = Path(plsc.__file__).parent

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = (
    ("plsc", "plsc.errors", "plsc.config", "plsc.console", "plsc.runtime", "plsc.atomic", "plsc.safe_pickle",
     "plsc.strict_json", "plsc.finite", "plsc.output_paths", "plsc.malloc", "plsc.parity", "plsc.names",
     "plsc.run_lock"),
    ("plsc.models", "plsc.data", "plsc.loss", "plsc.distributed", "plsc.faces"),
    ("plsc.checkpoint",),  # the checkpoint format, shards, PLSC v2.2 import, restoring a backbone
    ("plsc.export",),  # exported models and inference on them
    ("plsc.eval",),  # verification; its fast embedder runs an exported model
    ("plsc.engine",),  # training: evaluates and checkpoints as it goes
    ("plsc.demo", "plsc.bench", "plsc.capacity", "plsc.doctor", "plsc.launch"),
    ("plsc.cli", "plsc.seed_tools"),
)
# Upward imports being moved away, with where to. An entry that no longer occurs fails the test: remove it.
BEING_MOVED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest prefix of ``module`` that LAYERS names."""
    matches = [(len(name), index) for index, names in enumerate(LAYERS) for name in names
               if module == name or module.startswith(name + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return max(matches)[1]


def is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def plsc_imports(path: Path) -> set[str]:
    """The plsc modules ``path`` imports (``from plsc import x`` counts as plsc.x when x is a module)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
    return {name for name in found if name == "plsc" or name.startswith("plsc.")}


def test_every_import_points_down_or_sideways():
    upward = set()
    for path in sorted(ROOT.rglob("*.py")):
        importer = module_name(path)
        upward.update((importer, imported) for imported in plsc_imports(path)
                      if layer_of(imported) > layer_of(importer))
    unexpected = sorted(upward - BEING_MOVED.keys())
    lines = [f"{importer} imports {imported}" for importer, imported in unexpected]
    assert not unexpected, "imports pointing up a layer:\n" + "\n".join(lines)
    done = sorted(BEING_MOVED.keys() - upward)
    assert not done, f"no longer imported upwards, remove from BEING_MOVED: {done}"


def test_the_checker_sees_lazy_imports_and_submodules():
    """The walk finds an import inside a function and resolves ``from plsc.x import y`` to module x.y."""
    source = ROOT / "checkpoint" / "__init__.py"
    assert "plsc.checkpoint.shards" in plsc_imports(source)
    assert "plsc.distributed" in plsc_imports(source)
    assert "plsc.engine.trainer" in plsc_imports(ROOT / "cli.py")  # inside a function only
    assert layer_of("plsc.engine.trainer") > layer_of("plsc.eval.runner") > layer_of("plsc.checkpoint.plsc22")
