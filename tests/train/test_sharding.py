"""The same run on different meshes gives the same losses (8 forced CPU devices)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mesh_losses(model, meshes, steps, workdir, devices=8, overrides=None):
    """[per-step train losses] of each mesh in `meshes`, run one after the other in one
    process with `devices` CPU devices; `overrides` {dotted config key: value}."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT, MESH_LOSSES_SET=json.dumps(overrides or {}))
    out = subprocess.run([sys.executable, "-m", "tests.train.mesh_losses", model,
                          ";".join(meshes), str(steps), str(workdir)], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    results = [json.loads(line) for line in lines[-len(meshes):]]
    assert [r["devices"] for r in results] == [devices] * len(meshes)
    return [np.array(r["losses"]) for r in results]


def losses(model, mesh, steps, workdir, devices=8):
    return mesh_losses(model, [mesh], steps, workdir, devices)[0]


def check_meshes(model, meshes, steps, tmp_path):
    reference = losses(model, "1,1,1", steps, tmp_path / "single", devices=1)
    assert len(reference) == steps and reference[-1] < reference[0]
    for mesh, got in zip(meshes, mesh_losses(model, meshes, steps, tmp_path / "meshes"),
                         strict=True):
        np.testing.assert_allclose(got, reference, rtol=1e-5, err_msg=f"{model} {mesh}")


@pytest.mark.slow  # three 8-device compiles (~80 s); test_losses_match_across_meshes_20_steps
def test_bigs_losses_match_across_meshes(tmp_path):  # runs these meshes and more, longer
    check_meshes("bigs-tiny", ["8,1,1", "2,2,2"], 5, tmp_path)


@pytest.mark.slow  # tensor > 1 crashed M2's FFTs before blocks.per_shard (~4 min)
def test_m2_losses_match_across_meshes(tmp_path):
    check_meshes("m2-bert-tiny", ["8,1,1", "2,2,2", "1,1,8"], 5, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bigs-tiny", "bert-tiny"])
def test_losses_match_across_meshes_20_steps(model, tmp_path):
    check_meshes(model, ["8,1,1", "1,8,1", "2,2,2"], 20, tmp_path)


@pytest.mark.slow  # three 8-device compiles per model with the real embedding tables
@pytest.mark.parametrize("model,vocab,task,objective", [
    ("gpt2-tiny", 50257, "embedded_lm", "lm"), ("bert-tiny", 30522, "embedded_mlm", "mlm")])
def test_real_vocabularies_under_tensor_parallelism(model, vocab, task, objective, tmp_path):
    """GPT-2's 50257 and BERT's 30522 ids split over tensor=2 and tensor=8 once the table is
    padded to a multiple of 128: the same losses as pure data parallelism."""
    overrides = {"model.vocab_size": vocab, "model.vocab_multiple": 128, "model.ssm_state": None,
                 "data.task": task, "objective": objective}
    reference, *tensor = mesh_losses(model, ["8,1,1", "4,1,2", "1,1,8"], 5, tmp_path,
                                     overrides=overrides)
    assert len(reference) == 5 and reference[-1] < reference[0]
    for mesh, got in zip(["4,1,2", "1,1,8"], tensor, strict=True):
        np.testing.assert_allclose(got, reference, rtol=1e-5, err_msg=f"{model} {mesh}")


@pytest.mark.slow  # two 8-device compiles and one single-device one (~60 s)
def test_scanned_stacked_update_matches_across_meshes(tmp_path):
    """Scanned layers with the optimizer update on the stacked layers, FSDP and tensor
    sharded: the unrolled single-device run's losses (rtol 1e-5, as across meshes)."""
    reference = losses("bigs-tiny", "1,1,1", 5, tmp_path / "single", devices=1)
    stacked = {"model.scan_layers": True, "train.stacked_update": True}
    for mesh, got in zip(["8,1,1", "2,2,2"], mesh_losses("bigs-tiny", ["8,1,1", "2,2,2"], 5,
                                                         tmp_path / "meshes",
                                                         overrides=stacked), strict=True):
        np.testing.assert_allclose(got, reference, rtol=1e-5, err_msg=mesh)


def run_two_processes(model, mesh, steps, workdir, overrides=None):
    """Two processes × 4 CPU devices on 127.0.0.1, gloo collectives."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT, MESH_LOSSES_SET=json.dumps(overrides or {}))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.train.mesh_losses", model, mesh, str(steps),
         str(workdir), f"127.0.0.1:{port}", "2", str(i)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        results.append({**json.loads(out.strip().splitlines()[-1]), "stdout": out})
    return results


def streaming_overrides(corpus_dir) -> dict:
    """Config overrides of a streamed MLM task over 4 small text files written to
    `corpus_dir` (4 × 60 documents of the embedded corpus; validation: the first file)."""
    from bigs_jax.data import corpus

    docs = [doc.text for doc in corpus.documents("train")]
    corpus_dir.mkdir()
    for i in range(4):
        (corpus_dir / f"train-{i}.txt").write_text("\n".join(docs[i::4][:60]) + "\n")
    task = f"text_mlm:{corpus_dir}/train-*.txt,validation={corpus_dir}/train-0.txt"
    return {"data.task": task, "data.streaming": True, "data.shuffle_buffer": 64}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 processes x 4 devices == 1 process x 8 devices; each process reads its own half."""
    reference = losses("bigs-tiny", "8,1,1", 20, tmp_path / "one")
    results = run_two_processes("bigs-tiny", "8,1,1", 20, tmp_path / "two")
    for r in results:
        assert r["devices"] == 8
        np.testing.assert_allclose(r["losses"], reference, rtol=1e-5)
    rows = [set(map(tuple, r["first_batch_rows"])) for r in results]
    assert len(rows[0]) == len(rows[1]) == 4 and not rows[0] & rows[1]


@pytest.mark.slow
def test_two_processes_stream_with_uneven_eval_shards(tmp_path):
    """Streaming on two hosts: each reads its own files; the eval split's 3 files give host 0
    (files 0 and 2) many more eval batches than host 1 (file 1), so host 1 must pad with empty
    batches or the eval collectives would hang; both hosts report the same global losses."""
    from bigs_jax.data import corpus

    docs = [doc.text for doc in corpus.documents("train")]
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    for i in range(4):
        (corpus_dir / f"train-{i}.txt").write_text("\n".join(docs[i::4][:60]) + "\n")
    for i, (start, n) in enumerate(((300, 2), (310, 2), (320, 60))):
        (corpus_dir / f"valid-{i}.txt").write_text("\n".join(docs[start:start + n]) + "\n")
    task = f"text_mlm:{corpus_dir}/train-*.txt,validation={corpus_dir}/valid-*.txt"
    results = run_two_processes("bert-tiny", "8,1,1", 6, tmp_path / "two",
                                {"data.task": task, "data.streaming": True,
                                 "data.eval_batches": 0})
    for r in results:
        assert r["devices"] == 8 and len(r["losses"]) == 6
        assert np.isfinite(r["eval"]) and np.all(np.isfinite(r["losses"]))
    np.testing.assert_array_equal(results[0]["losses"], results[1]["losses"])
    assert results[0]["eval"] == results[1]["eval"]
    rows = [set(map(tuple, r["first_batch_rows"])) for r in results]
    assert rows[0] and rows[1] and not rows[0] & rows[1]


@pytest.mark.slow  # three two-process runs
def test_two_processes_resume_their_streams_exactly(tmp_path):
    """Streaming on two hosts, stopped at step 4 and resumed to 8: each host saved its own
    input position in the step and restores it (no replay), and the resumed steps' losses
    equal those of a run straight to 8."""
    overrides = streaming_overrides(tmp_path / "corpus")
    straight = run_two_processes("bert-tiny", "8,1,1", 8, tmp_path / "straight", overrides)
    run_two_processes("bert-tiny", "8,1,1", 4, tmp_path / "run", overrides)
    data = tmp_path / "run" / "checkpoints" / "4" / "data"
    assert {"process_0-of-2", "process_1-of-2"} <= set(os.listdir(data))
    resumed = run_two_processes("bert-tiny", "8,1,1", 8, tmp_path / "run", overrides)
    for got, want in zip(resumed, straight, strict=True):
        assert "resuming from step 4" in got["stdout"] and "replaying" not in got["stdout"]
        np.testing.assert_array_equal(got["losses"], want["losses"][4:])


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes(tmp_path):
    """Saved on (8,1,1); resumed on (2,2,2) and on one device: the same next step and eval."""
    import shutil

    def run(mesh, steps, workdir, devices=8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   PYTHONPATH=ROOT)
        out = subprocess.run([sys.executable, "-m", "tests.train.mesh_losses", "bigs-tiny",
                              mesh, str(steps), str(workdir)], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    straight = run("8,1,1", 5, tmp_path / "straight")
    run("8,1,1", 4, tmp_path / "saved")
    shutil.copytree(tmp_path / "saved", tmp_path / "saved_copy")
    for mesh, devices, workdir in (("2,2,2", 8, "saved"), ("1,1,1", 1, "saved_copy")):
        resumed = run(mesh, 5, tmp_path / workdir, devices)
        np.testing.assert_allclose(resumed["losses"], straight["losses"][-1:], rtol=1e-5)
        np.testing.assert_allclose(resumed["eval"], straight["eval"], rtol=1e-5)
