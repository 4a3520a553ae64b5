import os
import sys

import torch

# The suite runs on CPU timings unless a GPU is present. When it shares a
# session with tests/ (CI's --benchmark-disable pass) tests/conftest.py has
# already switched the interpreter on, so the fused rows run the real kernels.
sys.path.insert(0, os.path.dirname(__file__))

from common import env_description, size_class  # noqa: E402


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = metafunc.module.SHAPES[size_class(metafunc.config)]
        metafunc.parametrize("shape", [s for s in shapes], ids=[s["id"] for s in shapes])


def pytest_report_header(config):
    return f"nearl benchmarks: size class {size_class(config)!r} on {torch.device('cuda' if torch.cuda.is_available() else 'cpu')}"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["nearl_env"] = env_description()
