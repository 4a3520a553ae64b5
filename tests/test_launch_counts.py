"""Kernel launches of one training step (issue 17, part 2): what NEARL adds to its frozen floor.

The counts follow the code path, not the hardware (``benchmarks/launch_counts.py``),
so they are asserted against the committed result: the model's own glue
(launches beyond the floor outside the kernels' launchers) exactly, the whole
step as an upper bound, so a step that grows fails here until its counts are
re-recorded, and one that shrinks passes.
"""

import json
import os
import sys

import pytest

from nearl_kernels._dispatch import interpreting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import launch_counts  # noqa: E402

COMMITTED = os.path.join(ROOT, "benchmarks", "results", "launch_counts", "after.json")

pytestmark = pytest.mark.skipif(not interpreting(), reason="counts the Triton kernels under TRITON_INTERPRET=1 on CPU")


@pytest.fixture(scope="module")
def committed():
    with open(COMMITTED) as f:
        return json.load(f)["modes"]


@pytest.mark.parametrize("mode", ["paired", "shared"])
def test_step_launches_match_the_committed_counts(mode, committed):
    counts = launch_counts.step_counts(mode)
    want = committed[mode]
    assert counts["floor"]["total"] == want["floor"]["total"]
    assert launch_counts.model_glue(counts) == launch_counts.model_glue(want)
    assert counts["nearl"]["total"] <= want["nearl"]["total"]
    # Four interaction layers at the smoke shape: each launches the kernels of two OCAs and one USEformer block.
    assert sum(counts["nearl"]["triton"].values()) == sum(want["nearl"]["triton"].values())


def test_shared_mode_adds_no_more_glue_than_paired(committed):
    # Shared runs K text sequences instead of B*K; its extra text group costs a pad per layer, no more.
    layers = 4
    assert launch_counts.model_glue(committed["shared"]) <= launch_counts.model_glue(committed["paired"]) + 3 * layers
