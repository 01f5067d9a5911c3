"""The benchmark scripts' shared start: re-execute inside .venv-bench at the repository root,
creating it and installing `packages` from PyPI when `probe` (an import line) fails there."""

import os
import subprocess
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parent.parent / ".venv-bench"


def ensure_venv(packages: list[str], probe: str):
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if subprocess.run([str(py), "-c", probe], capture_output=True).returncode:
        subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True)
    os.execv(str(py), [str(py), *sys.argv])
