"""Package boundaries: `operator` stays the standard library's; the layering holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_operator_is_the_standard_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import operator, sys; print(operator.__file__); print(operator.add(2, 3))"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout.split()
    assert out[1] == "5"
    assert "site-packages" not in out[0] and not out[0].startswith(str(ROOT)), out[0]
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "trainer" / "__init__.py").exists()


def test_operator_side_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "import tailor_operator.cli, tailor_operator.cli_commands, tailor_operator.crdgen\n"
        "import tailor_operator.builders.trainer_config, tailor_trainer.config\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'ray') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_import_linter_contracts_hold() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([lint, str(ROOT / ".importlinter")], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower() or "0 broken" in result.stdout.lower()


def test_test_modules_have_unique_names() -> None:
    """The test directories are not packages: pytest imports each module by its file name, so two
    test_x.py in different directories break the whole collection (it happened twice)."""
    seen: dict[str, Path] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a module name"
        seen[path.name] = path
