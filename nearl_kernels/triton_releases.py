"""The compile gate under other Triton releases than the installed one.

Each release is installed once (``pip install --no-deps --target``) into a
cache directory, and the gate runs in a subprocess that imports it first, so
this process's own torch and Triton are untouched::

    python -m nearl_kernels.compile_check --triton 3.4.0,3.6.0,3.9.0 --arch sm_90

writes one report per release under ``OUT/triton-X.Y.Z/``. The cache is
``$NEARL_TRITON_CACHE`` or ``~/.cache/nearl/triton``.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache_root() -> str:
    return os.environ.get("NEARL_TRITON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nearl", "triton")


def install(version: str, root: Optional[str] = None) -> str:
    """The directory holding triton ``version`` (installed there on first use); raises RuntimeError
    with pip's last line if it cannot be installed."""
    root = root or cache_root()
    target = os.path.join(root, version)
    if os.path.isdir(os.path.join(target, "triton")):
        return target
    os.makedirs(root, exist_ok=True)
    # Into a fresh directory, renamed into place when complete: a killed install leaves no half release.
    tmp = tempfile.mkdtemp(prefix=f".{version}-", dir=root)
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                              "--target", tmp, f"triton=={version}"], capture_output=True, text=True)
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise RuntimeError(f"cannot install triton=={version}: {last}")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_under(version: str, gate_args: List[str], out_dir: str) -> int:
    """Run ``python -m nearl_kernels.compile_check GATE_ARGS --out OUT_DIR`` with triton ``version``
    first on the path; returns its exit code (2 if the release cannot be installed)."""
    try:
        site = install(version)
    except RuntimeError as err:
        print(f"compile_check: {err}", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([site, _PACKAGE_PARENT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["NEARL_EXPECT_TRITON"] = version
    cmd = [sys.executable, "-m", "nearl_kernels.compile_check", *gate_args, "--out", out_dir]
    return subprocess.call(cmd, env=env)


def run_matrix(versions: List[str], gate_args: List[str], out_dir: str) -> int:
    """The gate under each release in turn; prints one verdict line per release, returns 0 if all passed."""
    verdicts: Dict[str, int] = {}
    for version in versions:
        print(f"\n=== triton {version} ===", flush=True)
        verdicts[version] = run_under(version, gate_args, os.path.join(out_dir, f"triton-{version}"))
    print("\ncompile gate across releases:")
    for version, rc in verdicts.items():
        verdict = {0: "PASS", 1: "FAIL"}.get(rc, f"could not run (exit {rc})")
        print(f"  triton {version}: {verdict}")
    return 0 if all(rc == 0 for rc in verdicts.values()) else 1
