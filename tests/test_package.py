"""The package's public surface: the names at ``klvae`` resolve, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import klvae


@pytest.mark.parametrize("name", [n for n in klvae.__all__ if n != "__version__"])
def test_every_public_name_resolves(name: str) -> None:
    obj = getattr(klvae, name)
    assert obj.__name__ == name and obj.__doc__, f"klvae.{name} needs a docstring"


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        klvae.nope  # noqa: B018


def test_package_imports_are_lazy() -> None:
    # `import klvae`, `klvae.data` and `klvae.inference` must not drag in Lightning, lpips or webdataset.
    code = (
        "import sys, klvae, klvae.data, klvae.models, klvae.callbacks, klvae.interop, klvae.training\n"
        "from klvae import InferenceVAE\n"
        "heavy = [m for m in ('pytorch_lightning', 'lightning_fabric', 'lpips', 'webdataset', 'wandb') "
        "if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _module_level_imports() -> dict[str, set[str]]:
    """klvae module → klvae modules it imports at module level (not inside functions)."""
    import ast
    from pathlib import Path

    root = Path(klvae.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.parse(
            path.read_text()
        ).body:  # top level only: lazy imports inside functions are fine
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("klvae"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("klvae")}
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles() -> None:
    graph = _module_level_imports()
    assert "klvae.interop.formats" in graph and "klvae.interop.keys" in graph["klvae.interop.formats"]
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(module) :], module]))
        if module in done or module not in graph:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_network_and_inference_never_import_lightning() -> None:
    graph = _module_level_imports()
    code = "import sys, klvae.modules.vae, klvae.modules.losses, klvae.inference; print('pytorch_lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
    assert not any(dep.startswith(("klvae.models", "klvae.training")) for m, deps in graph.items()
                   if m.startswith("klvae.modules") for dep in deps)  # fmt: skip


def test_the_package_never_imports_benchmarks() -> None:
    import ast
    from pathlib import Path

    offenders = []
    for path in Path(klvae.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):  # anywhere: functions' lazy imports too
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "benchmarks"]
    assert not offenders, offenders


# From the bottom up; a module may import its own layer and the ones below, never one above.
LAYERS = [
    ("klvae._lazy", "klvae.errors", "klvae.io", "klvae.util"),
    ("klvae.modules",),
    ("klvae.interop", "klvae.data", "klvae.evaluation", "klvae.inference", "klvae.perf"),
    ("klvae.models",),
    ("klvae.callbacks", "klvae.training"),
    ("klvae.pretrained", "klvae.diffusability"),  # tools
]


def _layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_layers_point_one_way() -> None:
    """Every import of every klvae module, the lazy ones inside functions too, points down the layers."""
    import ast
    from pathlib import Path

    root = Path(klvae.__file__).parent
    offenders, unplaced = [], []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module == "klvae":
            continue  # the public API re-exports every layer, lazily
        own = _layer(module)
        if own is None:
            unplaced.append(module)
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                target = _layer(name) if name.startswith("klvae.") else None
                if target is not None and target > own:
                    offenders.append(f"{module} -> {name}")
    assert not unplaced, f"modules in no layer: {unplaced}"
    assert not offenders, offenders
