import subprocess
import sys


def test_core_does_not_import_ray_optuna_or_mlflow():
    code = (
        "import sys, raymix, raymix.cli, raymix.engine.run, raymix.methods, raymix.data\n"
        "print(sorted(m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
