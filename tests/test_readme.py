"""The README's quick start is exactly two commands, and CI runs the second one."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_start_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_two_commands_install_then_train_and_install_then_test():
    train, test = quick_start_commands()
    assert train == "pip install -e . && python -m nearl_model.train"
    assert test.startswith('pip install -e ".[dev]" && pytest')


def test_ci_runs_the_readme_test_command():
    script = open(os.path.join(ROOT, ".ci", "run")).read()
    awk = re.search(r"cmd=\$\((awk .*? README\.md)\)", script).group(1)
    extracted = subprocess.run(["bash", "-c", awk], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == quick_start_commands()[1]


def test_quick_start_figures_are_what_the_quick_start_prints(tmp_path):
    """The README's accuracy and AUROC come from a run, and a fresh run lands within the stated tolerance."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import readme_figures
    finally:
        sys.path.pop(0)
    fig = readme_figures.run_quick_start(str(tmp_path / "run"))
    assert readme_figures.mismatches(open(os.path.join(ROOT, "README.md")).read(), fig) == []
