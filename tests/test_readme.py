"""The README's quick start is exactly two commands, and CI runs the second one."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_start_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_two_commands_install_then_train_and_install_then_test():
    train, test = quick_start_commands()
    assert train == "pip install -e . && python -m nearl_model.train --fused"
    assert test.startswith('pip install -e ".[dev]" && pytest')


def test_ci_runs_the_readme_test_command():
    script = open(os.path.join(ROOT, ".ci", "run")).read()
    awk = re.search(r"cmd=\$\((awk .*? README\.md)\)", script).group(1)
    extracted = subprocess.run(["bash", "-c", awk], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == quick_start_commands()[1]
