"""The development-build patches still apply to the kernel sources they patch: benchmarks/tools/ (timeline probes
that write clocks instead of outputs, and builds that time one half of a kernel, kept out of the library's source
on purpose) and benchmarks/variants/ (candidate kernel changes not yet measured). A kernel change that moves the
lines they hook into must regenerate them; this test says so instead of the next device session."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PATCHES = (sorted((ROOT / "benchmarks" / "tools").glob("*.patch"))
           + sorted((ROOT / "benchmarks" / "variants").glob("*.patch")))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_probe_patch_applies(patch):
    result = subprocess.run(["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"{patch.name} no longer applies; regenerate it against the kernel: {result.stderr}"


def test_probe_patches_exist():
    assert PATCHES, "benchmarks/tools/ holds no development-build patch (the notes cite them)"
