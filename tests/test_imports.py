import subprocess
import sys


def test_core_does_not_import_ray_optuna_or_mlflow():
    code = (
        "import sys, raymix, raymix.cli, raymix.engine.run, raymix.methods, raymix.data\n"
        "print(sorted(m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imports_of(path) -> set[str]:
    """raymix modules ``path`` imports anywhere (TYPE_CHECKING blocks and functions included)."""
    import ast

    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raymix"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("raymix"))
    return found


def test_integration_modules_import_one_way():
    """No import cycles among raymix.integrations modules, deferred or type-only imports included."""
    from pathlib import Path

    folder = Path(__file__).parents[1] / "raymix" / "integrations"
    modules = {f"raymix.integrations.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    edges = {name: _imports_of(path) & set(modules) - {name} for name, path in modules.items()}
    assert "raymix.integrations.plan" in edges["raymix.integrations.tracking"]
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"import cycle: {' -> '.join((*stack, name))}"
        if name in done:
            return
        for other in sorted(edges[name]):
            visit(other, (*stack, name))
        done.add(name)

    for name in sorted(modules):
        visit(name, ())
