"""The same run on different meshes gives the same losses (8 forced CPU devices)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def losses(model, mesh, steps, workdir, devices=8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "tests.train.mesh_losses", model, mesh,
                          str(steps), str(workdir)], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == devices
    return np.array(result["losses"])


def check_meshes(model, meshes, steps, tmp_path):
    reference = losses(model, "1,1,1", steps, tmp_path / "single", devices=1)
    assert len(reference) == steps and reference[-1] < reference[0]
    for mesh in meshes:
        got = losses(model, mesh, steps, tmp_path / mesh.replace(",", "x"))
        np.testing.assert_allclose(got, reference, rtol=1e-5, err_msg=f"{model} {mesh}")


def test_bigs_losses_match_across_meshes(tmp_path):
    check_meshes("bigs-tiny", ["8,1,1", "2,2,2"], 5, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bigs-tiny", "bert-tiny"])
def test_losses_match_across_meshes_20_steps(model, tmp_path):
    check_meshes(model, ["8,1,1", "1,8,1", "2,2,2"], 20, tmp_path)
