"""Issue 17's table (acceptance 3): bad inputs and faults as a new user hits them.

    PYTHONPATH=. python tests/probe_bad_inputs.py [--out table.md] [--only NAME,...]

Every case runs in a fresh temporary directory through the user's entry points (train.py,
eval.py, `python -m bigs_jax.convert`, `python -m bigs_jax.data inspect`, `python -m
bigs_jax.generate`, or the Python API in a `python -c` process); every file under that
directory (workdirs, checkpoints, vocabularies, data, output dirs) is hashed before and after.
A row records the exit code, the message the user sees (the last `error:` line, the API
exception's text, or for a run that succeeds its first `warning:` line or last line), whether
the message is one line without a traceback, and which files changed. Each case declares what
it expects (exit code 0 or not, one line, a part of the message, whether files may change);
`tests/test_probe_bad_inputs.py` runs the probe and asserts all of them.

Runs share a compilation cache and XLA:CPU optimization level 0, as the test suite does
(tests/conftest.py); the whole probe takes about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
S = "--config=configs/quickstart.py:smoke"
SHORT = ["--config.train.steps=2", "--config.train.eval_every=2",
         "--config.train.checkpoint_every=2"]
# The base run every resume case copies: checkpoints 2 and 4 (tests/runs.py's smoke schedule).
RUN4 = [S, "--config.train.steps=4", "--config.train.eval_every=2",
        "--config.train.checkpoint_every=2", "--config.optim.schedule=constant",
        "--config.optim.warmup_steps=0"]
GLUE = ["--config=configs/glue.py:smoke", "--config.tasks=sst2", "--config.max_steps=2"]
# A Python API call as a user types it; the exception's text (all of it) follows the marker.
API = """
import sys
import numpy as np
import bigs_jax
try:
{body}
except Exception as e:
    print("--- " + type(e).__name__, file=sys.stderr)
    print(str(e), file=sys.stderr)
    sys.exit(1)
"""
MARKER = "--- "


@dataclasses.dataclass
class Cmd:
    """One process of a case: argv (or API code), and an optional fault to inject."""
    argv: list
    kill: Optional[tuple] = None      # (signal, path whose appearance triggers it)
    preexec: Optional[Callable] = None
    env: Optional[dict] = None
    show: str = ""                    # the command as the table shows it
    setup: bool = False               # part of the case's setup: runs before the hashing


@dataclasses.dataclass
class Case:
    name: str
    what: str
    make: Callable      # make(fixtures, case_dir) -> [Cmd, ...]; the row is the last one's
    rc: int             # expected exit code: 0, or 1 for "not 0"
    expect: str         # a part of the expected message
    disk: bool = False  # may files under the case directory change
    one_line: bool = True
    allow: tuple = ()   # changes a failed case may still make (e.g. '+out/bigs_jax.json')


CASES: list[Case] = []


def case(what: str, rc: int, expect: str, disk: bool = False, one_line: bool = True,
         allow: tuple = ()):
    def register(make):
        CASES.append(Case(make.__name__, what, make, rc, expect, disk, one_line, allow))
        return make
    return register


def cli(script: str, *args, **kw) -> Cmd:
    argv = [PY, script, *map(str, args)] if script.endswith(".py") else \
        [PY, "-m", script, *map(str, args)]
    shown = ("python " + script if script.endswith(".py") else "python -m " + script)
    return Cmd(argv, show=" ".join([shown, *map(str, args)]), **kw)


def api(code: str) -> Cmd:
    body = "\n".join("    " + line for line in code.strip().splitlines())
    return Cmd([PY, "-c", API.format(body=body)], show=code.strip().replace("\n", "; "))


def copy(src, dst) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return Path(dst)


def checkpoint(workdir, step) -> Path:
    return Path(workdir) / "checkpoints" / str(step)


def truncate_largest(step_dir) -> None:
    files = [p for p in (Path(step_dir) / "params").rglob("*") if p.is_file()]
    path = max(files, key=lambda p: p.stat().st_size)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG, as on a full disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# Run as root without the capabilities that override file modes, so that a read-only
# directory is read-only (the probe usually runs as root in containers).
NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
               "--inh-caps=-dac_override,-dac_read_search"]


# ---------------------------------------------------------------------------- fixtures


def build_fixtures(base: Path, env: dict) -> dict:
    """Built once per probe; cases copy them: a train.py run (checkpoints 2, 4), a GPT-2 run,
    a tiny HF BERT directory with its vocab.txt, GLUE files."""
    fx = {"run": base / "run4", "gpt": base / "gpt2", "hf": base / "hf_bert",
          "glue": base / "glue"}
    steps = [
        [PY, "train.py", *RUN4, f"--workdir={fx['run']}"],
        [PY, "train.py", "--config=configs/gpt2.py:smoke", *SHORT, f"--workdir={fx['gpt']}"],
        [PY, "-c", "import sys; from tests.convert.tiny_hf import save_tiny, transformers as tr;"
         "from tests.evals.glue_files import write_vocab, write_glue;"
         "save_tiny(tr.BertForMaskedLM, tr.BertConfig(vocab_size=61, hidden_size=24, "
         "num_hidden_layers=2, num_attention_heads=2, intermediate_size=40, "
         "max_position_embeddings=32), sys.argv[1]); write_vocab(sys.argv[1] + '/vocab.txt');"
         "write_glue(sys.argv[2])", str(fx["hf"]), str(fx["glue"])],
    ]
    for argv in steps:
        p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if p.returncode:
            sys.exit(f"probe fixture failed: {' '.join(argv)}\n{p.stderr[-3000:]}")
    for path in fx.values():  # cases copy these; none may write into them
        assert path.exists(), path
    return fx


# ---------------------------------------------------------------------------- item 1


@case("workdir is an HF model directory", 1, "is not a bigs_jax run directory")
def foreign_hf_workdir(fx, d):
    hf = copy(fx["hf"], d / "hf_bert")
    return [cli("train.py", S, *SHORT, f"--workdir={hf}")]


@case("workdir holds a file of the user's", 1, "is not a bigs_jax run directory")
def foreign_notes_workdir(fx, d):
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("my notes")
    return [cli("train.py", S, *SHORT, f"--workdir={d / 'mine'}")]


@case("workdir is an existing regular file", 1, "workdir")
def workdir_is_a_file(fx, d):
    (d / "run").write_text("a file")
    return [cli("train.py", S, *SHORT, f"--workdir={d / 'run'}")]


@case("eval.py output dir is an HF model directory", 1, "not a bigs_jax eval directory")
def foreign_eval_output(fx, d):
    run, hf = copy(fx["run"], d / "run"), copy(fx["hf"], d / "hf_bert")
    glue = copy(fx["glue"], d / "glue")
    return [cli("eval.py", *GLUE, f"--config.init={run}", f"--config.data_dir={glue}",
                f"--workdir={hf}")]


@case("bigs_jax.json of a run is not JSON", 1, "has a damaged bigs_jax.json")
def damaged_marker(fx, d):
    run = copy(fx["run"], d / "run")
    (run / "bigs_jax.json").write_text("{not json")
    return [cli("train.py", *RUN4, f"--workdir={run}")]


@case("config.json of a run is not JSON", 1, "config.json that cannot be read")
def malformed_config_json(fx, d):
    run = copy(fx["run"], d / "run")
    (run / "config.json").write_text("{not json")
    return [cli("train.py", *RUN4, f"--workdir={run}")]


@case("model.json of a run is not JSON (bigs_jax.load)", 1, "model.json")
def load_malformed_model_json(fx, d):
    run = copy(fx["run"], d / "run")
    (run / "model.json").write_text("{not json")
    return [api(f"bigs_jax.load({str(run)!r})")]


# ---------------------------------------------------------------------------- item 2


def resume_damaged(fx, d, damage):
    run = copy(fx["run"], d / "run")
    damage(checkpoint(run, 4))
    return [cli("train.py", *RUN4, f"--workdir={run}")]


@case("newest checkpoint: a params file truncated; train.py resumes", 0,
      "warning: checkpoint step 4 is damaged (its files cannot be read", disk=True)
def damaged_truncated(fx, d):
    return resume_damaged(fx, d, truncate_largest)


@case("newest checkpoint: params/_METADATA deleted; train.py resumes", 0,
      "warning: checkpoint step 4 is damaged (params/_METADATA is missing", disk=True)
def damaged_no_metadata(fx, d):
    return resume_damaged(fx, d, lambda step: os.remove(step / "params" / "_METADATA"))


@case("newest checkpoint: params/ deleted; train.py resumes", 0,
      "warning: checkpoint step 4 is damaged (params/ is missing", disk=True)
def damaged_no_params(fx, d):
    return resume_damaged(fx, d, lambda step: shutil.rmtree(step / "params"))


@case("newest checkpoint: only _CHECKPOINT_METADATA deleted (expected to resume)", 0,
      "done", disk=True)
def damaged_no_checkpoint_metadata(fx, d):
    return resume_damaged(fx, d, lambda step: os.remove(step / "_CHECKPOINT_METADATA"))


@case("the only checkpoint damaged; train.py", 1, "no intact checkpoint in")
def damaged_only_checkpoint(fx, d):
    run = copy(fx["run"], d / "run")
    shutil.rmtree(checkpoint(run, 2))
    os.remove(checkpoint(run, 4) / "params" / "_METADATA")
    return [cli("train.py", *RUN4, f"--workdir={run}")]


@case("bigs_jax.load of a run whose newest params file is truncated", 1,
      "checkpoint step 4 in")
def load_damaged_truncated(fx, d):
    run = copy(fx["run"], d / "run")
    truncate_largest(checkpoint(run, 4))
    return [api(f"bigs_jax.load({str(run)!r})")]


@case("bigs_jax.load of a run whose newest params/ is deleted", 1,
      "intact steps: [2]; load an intact one with")
def load_damaged_no_params(fx, d):
    run = copy(fx["run"], d / "run")
    shutil.rmtree(checkpoint(run, 4) / "params")
    return [api(f"bigs_jax.load({str(run)!r})")]


@case("eval.py --config.init of a run whose newest checkpoint is damaged", 1, "damaged")
def eval_init_damaged(fx, d):
    run = copy(fx["run"], d / "run")
    shutil.rmtree(checkpoint(run, 4) / "params")
    glue = copy(fx["glue"], d / "glue")
    return [cli("eval.py", *GLUE, f"--config.init={run}", f"--config.data_dir={glue}",
                f"--workdir={d / 'out'}")]


# ---------------------------------------------------------------------------- item 3


@case("model call with ids >= vocab_size", 1, "ids outside the vocabulary, in [")
def api_ids_too_large(fx, d):
    return [api("model = bigs_jax.create('bigs-tiny', num_layers=1)\n"
                "model(np.array([[5, 40000, 3]], np.int32))")]


@case("model call with negative ids", 1, "ids outside the vocabulary, in [-1, -1]")
def api_ids_negative(fx, d):
    return [api("model = bigs_jax.create('gpt2-tiny', num_layers=1)\n"
                "model(np.array([[5, -1, 3]], np.int32))")]


@case("model call with token_type_ids >= type_vocab_size", 1, "token_type_ids")
def api_token_types_too_large(fx, d):
    return [api("model = bigs_jax.create('bert-tiny', num_layers=1)\n"
                "model(np.array([[5, 6, 3]], np.int32), "
                "token_type_ids=np.array([[0, 1, 7]], np.int32))")]


@case("model call with negative token_type_ids", 1, "token_type_ids")
def api_token_types_negative(fx, d):
    return [api("model = bigs_jax.create('bert-tiny', num_layers=1)\n"
                "model(np.array([[5, 6, 3]], np.int32), "
                "token_type_ids=np.array([[0, -1, 0]], np.int32))")]


@case("model call with float input_ids", 1, "input_ids must be integer token ids")
def api_float_ids(fx, d):
    return [api("bigs_jax.create('bert-tiny', num_layers=1)(np.ones((1, 8), np.float32))")]


@case("model call with an attention_mask of another shape", 1, "attention_mask has shape")
def api_bad_mask(fx, d):
    return [api("bigs_jax.create('bert-tiny', num_layers=1)(np.ones((2, 8), np.int32), "
                "attention_mask=np.ones((2, 5), np.int32))")]


@case("train.py: the data's vocabulary is larger than the model's", 1, "vocab")
def train_vocab_smaller_than_data(fx, d):
    return [cli("train.py", S, *SHORT, "--config.model.vocab_size=1000",
                "--config.model.vocab_multiple=1", f"--workdir={d / 'run'}")]


@case("bigs_jax.generate with prompt ids outside the vocabulary", 1,
      "holds ids outside the vocabulary")
def api_generate_bad_ids(fx, d):
    return [api("model = bigs_jax.create('gpt2-tiny', num_layers=1)\n"
                "bigs_jax.generate(model, [[3, 99999]], max_new_tokens=2)")]


# ---------------------------------------------------------------------------- item 4


@case("eval.py GLUE of a train.py workdir (SentencePiece vocabulary)", 0, "", disk=True)
def glue_eval_of_train_workdir(fx, d):
    run, glue = copy(fx["run"], d / "run"), copy(fx["glue"], d / "glue")
    return [cli("eval.py", *GLUE, f"--config.init={run}", f"--config.data_dir={glue}",
                f"--workdir={d / 'out'}")]


@case("eval.py of a converted HF BERT that has no vocab.txt", 1, "vocab")
def eval_converted_without_vocab(fx, d):
    hf = copy(fx["hf"], d / "hf_bert")
    os.remove(hf / "vocab.txt")
    glue = copy(fx["glue"], d / "glue")
    return [cli("bigs_jax.convert", hf, d / "ours", setup=True),
            cli("eval.py", *GLUE, f"--config.init={d / 'ours'}", f"--config.data_dir={glue}",
                "--config.max_len=32", "--config.eval_max_len=32", f"--workdir={d / 'out'}")]


# ---------------------------------------------------------------------------- item 5


@case("config argument typo quickstart.py:smok", 1, "unknown config argument 'smok'")
def typo_smok(fx, d):
    return [cli("train.py", "--config=configs/quickstart.py:smok", f"--workdir={d / 'run'}")]


@case("config argument typo bert.py:sise=tiny", 1, "unknown config argument 'sise'")
def typo_sise(fx, d):
    return [cli("train.py", "--config=configs/bert.py:sise=tiny", f"--workdir={d / 'run'}")]


@case("--config.train.steps=-5", 1, "config.train.steps=-5 (must be >= 1)")
def negative_steps(fx, d):
    return [cli("train.py", S, "--config.train.steps=-5", f"--workdir={d / 'run'}")]


@case("resume with a changed lr", 1, "optim.lr")
def resume_changed_lr(fx, d):
    run = copy(fx["run"], d / "run")
    return [cli("train.py", *RUN4, "--config.train.steps=6", "--config.optim.lr=1e-2",
                f"--workdir={run}")]


@case("resume with a changed batch size", 1, "data.batch_size")
def resume_changed_batch(fx, d):
    run = copy(fx["run"], d / "run")
    return [cli("train.py", *RUN4, "--config.train.steps=6", "--config.data.batch_size=4",
                f"--workdir={run}")]


@case("resume with a changed lr and allow_config_change", 0, "done", disk=True)
def resume_changed_lr_allowed(fx, d):
    run = copy(fx["run"], d / "run")
    return [cli("train.py", *RUN4, "--config.train.steps=6", "--config.optim.lr=1e-2",
                "--config.train.allow_config_change=True", f"--workdir={run}")]


# ---------------------------------------------------------------------------- config mistakes


@case("wrong type: --config.train.steps=abc", 1, "steps")
def type_steps(fx, d):
    return [cli("train.py", S, "--config.train.steps=abc", f"--workdir={d / 'run'}")]


@case("wrong type: --config.optim.lr=fast", 1, "lr")
def type_lr(fx, d):
    return [cli("train.py", S, "--config.optim.lr=fast", f"--workdir={d / 'run'}")]


@case("wrong type: --config.data.streaming=maybe", 1, "streaming")
def type_bool(fx, d):
    return [cli("train.py", S, "--config.data.streaming=maybe", f"--workdir={d / 'run'}")]


@case("unknown key --config.model.nme=x", 1, "nme")
def unknown_key(fx, d):
    return [cli("train.py", S, "--config.model.nme=x", f"--workdir={d / 'run'}")]


@case("unknown section --config.trian.steps=3", 1, "trian")
def unknown_section(fx, d):
    return [cli("train.py", S, "--config.trian.steps=3", f"--workdir={d / 'run'}")]


@case("missing config file", 1, "nope.py")
def missing_config(fx, d):
    return [cli("train.py", "--config=configs/nope.py", f"--workdir={d / 'run'}")]


@case("a stray positional argument", 1, "unexpected arguments")
def stray_argument(fx, d):
    return [cli("train.py", S, "steps=3", f"--workdir={d / 'run'}")]


@case("--config.optim.lr=nan", 1, "config.optim.lr=nan")
def lr_nan(fx, d):
    return [cli("train.py", S, "--config.optim.lr=nan", f"--workdir={d / 'run'}")]


@case("--config.optim.b2=1.0 (Adam beta must be < 1)", 1, "config.optim.b2=1.0")
def beta_one(fx, d):
    return [cli("train.py", S, "--config.optim.b2=1.0", f"--workdir={d / 'run'}")]


@case("unknown model name --config.model.name=bigs-smal", 1, "bigs-smal")
def unknown_model(fx, d):
    return [cli("train.py", S, "--config.model.name=bigs-smal", f"--workdir={d / 'run'}")]


@case("unknown task --config.data.task=embedded_mlmm", 1, "embedded_mlmm")
def unknown_task(fx, d):
    return [cli("train.py", S, *SHORT, "--config.data.task=embedded_mlmm",
                f"--workdir={d / 'run'}")]


@case("unknown mixture recipe mix:nope", 1, "nope")
def unknown_mixture(fx, d):
    return [cli("train.py", S, *SHORT, "--config.data.task=mix:nope",
                f"--workdir={d / 'run'}")]


@case("batch 8 does not split into grad_accum_steps=3", 1, "grad_accum_steps")
def accum_does_not_divide(fx, d):
    return [cli("train.py", S, *SHORT, "--config.train.grad_accum_steps=3",
                f"--workdir={d / 'run'}")]


@case("--config.data.seq_len=-1", 1, "config.data.seq_len=-1 (must be >= 0)")
def seq_len_negative(fx, d):
    return [cli("train.py", S, *SHORT, "--config.data.seq_len=-1",
                f"--workdir={d / 'run'}")]


@case("mesh (2, 1, 1) on 1 device", 1, "mesh")
def mesh_mismatch(fx, d):
    return [cli("train.py", S, *SHORT, "--config.mesh.shape=(2, 1, 1)",
                f"--workdir={d / 'run'}")]


@case("mesh of the wrong rank (3, 5)", 1, "config.mesh.shape (3, 5) must have 3 entries")
def mesh_rank(fx, d):
    return [cli("train.py", S, *SHORT, "--config.mesh.shape=(3, 5)", f"--workdir={d / 'run'}")]


@case("--config.model.vocab_multiple=0", 1, "vocab_multiple")
def vocab_multiple_zero(fx, d):
    return [cli("train.py", S, *SHORT, "--config.model.vocab_multiple=0",
                f"--workdir={d / 'run'}")]


@case("--config.model.vocab_multiple=-128", 1, "vocab_multiple")
def vocab_multiple_negative(fx, d):
    return [cli("train.py", S, *SHORT, "--config.model.vocab_multiple=-128",
                f"--workdir={d / 'run'}")]


@case("--config.init names a missing workdir", 1, "does not exist")
def train_init_missing(fx, d):
    return [cli("train.py", S, *SHORT, f"--config.init={d / 'missing'}",
                f"--workdir={d / 'run'}")]


# ---------------------------------------------------------------------------- eval.py


@case("eval.py without --config.init", 1, "init")
def eval_no_init(fx, d):
    glue = copy(fx["glue"], d / "glue")
    return [cli("eval.py", *GLUE, f"--config.data_dir={glue}", f"--workdir={d / 'out'}")]


@case("eval.py --config.init of a missing path", 1, "does not exist")
def eval_init_missing(fx, d):
    glue = copy(fx["glue"], d / "glue")
    return [cli("eval.py", *GLUE, f"--config.init={d / 'missing'}",
                f"--config.data_dir={glue}", f"--workdir={d / 'out'}")]


@case("eval.py --config.init of an empty directory", 1, "")
def eval_init_empty(fx, d):
    (d / "empty").mkdir()
    glue = copy(fx["glue"], d / "glue")
    return [cli("eval.py", *GLUE, f"--config.init={d / 'empty'}", f"--config.data_dir={glue}",
                f"--workdir={d / 'out'}")]


@case("eval.py --config.init of an HF directory (not converted)", 1, "convert")
def eval_init_hf(fx, d):
    hf, glue = copy(fx["hf"], d / "hf_bert"), copy(fx["glue"], d / "glue")
    return [cli("eval.py", *GLUE, f"--config.init={hf}", f"--config.data_dir={glue}",
                f"--workdir={d / 'out'}")]


@case("eval.py --config.tasks=sst3", 1, "sst3")
def eval_unknown_task(fx, d):
    run, glue = copy(fx["run"], d / "run"), copy(fx["glue"], d / "glue")
    return [cli("eval.py", *GLUE, "--config.tasks=sst3", f"--config.init={run}",
                f"--config.data_dir={glue}", f"--workdir={d / 'out'}")]


@case("eval.py with a GLUE data_dir that does not exist", 1, "")
def eval_missing_data(fx, d):
    run = copy(fx["run"], d / "run")
    return [cli("eval.py", *GLUE, f"--config.init={run}", f"--config.data_dir={d / 'nodata'}",
                f"--workdir={d / 'out'}")]


@case("eval.py --config.vocab_file that does not exist", 1, "")
def eval_missing_vocab(fx, d):
    run, glue = copy(fx["run"], d / "run"), copy(fx["glue"], d / "glue")
    return [cli("eval.py", *GLUE, f"--config.init={run}", f"--config.data_dir={glue}",
                f"--config.vocab_file={d / 'vocab.txt'}", f"--workdir={d / 'out'}")]


# ---------------------------------------------------------------------------- Python API


@case("bigs_jax.load of a missing path", 1, "does not exist")
def load_missing(fx, d):
    return [api(f"bigs_jax.load({str(d / 'missing')!r})")]


@case("bigs_jax.load of an empty directory", 1, "")
def load_empty(fx, d):
    (d / "empty").mkdir()
    return [api(f"bigs_jax.load({str(d / 'empty')!r})")]


@case("bigs_jax.load of an HF directory (not converted)", 1, "convert")
def load_hf(fx, d):
    hf = copy(fx["hf"], d / "hf_bert")
    return [api(f"bigs_jax.load({str(hf)!r})")]


@case("bigs_jax.load(step=99) of a run with steps 2, 4", 1, "99")
def load_missing_step(fx, d):
    run = copy(fx["run"], d / "run")
    return [api(f"bigs_jax.load({str(run)!r}, step=99)")]


@case("bigs_jax.create of an unknown name", 1, "unknown model 'bert-tinny'")
def create_unknown(fx, d):
    return [api("bigs_jax.create('bert-tinny')")]


@case("bigs_jax.create with an unknown option", 1, "unknown option(s)")
def create_unknown_option(fx, d):
    return [api("bigs_jax.create('bert-tiny', hidden_sise=64)")]


@case("bigs_jax.create with heads that do not divide hidden_size", 1, "num_heads")
def create_bad_heads(fx, d):
    return [api("bigs_jax.create('gpt2-tiny', num_heads=5)")]


@case("bigs_jax.create with num_layers=-1", 1, "num_layers=-1 must be >= 1")
def create_negative_layers(fx, d):
    return [api("bigs_jax.create('bert-tiny', num_layers=-1)")]


@case("bigs_jax.embed with a mask of another shape", 1, "shape")
def embed_bad_mask(fx, d):
    return [api("model = bigs_jax.create('bert-tiny', num_layers=1)\n"
                "bigs_jax.embed(model, np.ones((2, 8), np.int32), np.ones((2, 3), np.int32))")]


@case("bigs_jax.generate with an empty prompt", 1, "prompt 0 is empty")
def api_generate_empty(fx, d):
    return [api("model = bigs_jax.create('gpt2-tiny', num_layers=1)\n"
                "bigs_jax.generate(model, [[]], max_new_tokens=2)")]


@case("bigs_jax.generate with num_beams=0", 1, "num_beams must be >= 1")
def api_generate_beams(fx, d):
    return [api("model = bigs_jax.create('gpt2-tiny', num_layers=1)\n"
                "bigs_jax.generate(model, [[3, 4]], max_new_tokens=2, num_beams=0)")]


@case("bigs_jax.generate with an encoder", 1, "cannot generate text")
def api_generate_encoder(fx, d):
    return [api("bigs_jax.generate(bigs_jax.create('bert-tiny', num_layers=1), [[3, 4]])")]


# ---------------------------------------------------------------------------- convert


@case("convert: SRC does not exist", 1, "is not a directory")
def convert_missing_src(fx, d):
    return [cli("bigs_jax.convert", d / "missing", d / "out")]


@case("convert: SRC is an empty directory", 1, "cannot tell the format")
def convert_empty_src(fx, d):
    (d / "empty").mkdir()
    return [cli("bigs_jax.convert", d / "empty", d / "out")]


@case("convert: SRC holds no checkpoint (a notes file)", 1, "cannot tell the format")
def convert_not_hf(fx, d):
    (d / "src").mkdir()
    (d / "src" / "notes.txt").write_text("mine")
    return [cli("bigs_jax.convert", d / "src", d / "out")]


@case("convert: DST exists", 1, "already exists")
def convert_existing_dst(fx, d):
    hf = copy(fx["hf"], d / "hf_bert")
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("mine")
    return [cli("bigs_jax.convert", hf, d / "out")]


@case("convert: --to onnx", 1, "onnx")
def convert_unknown_to(fx, d):
    hf = copy(fx["hf"], d / "hf_bert")
    return [cli("bigs_jax.convert", hf, d / "out", "--to", "onnx")]


@case("convert: --from bogus", 1, "invalid choice")
def convert_unknown_from(fx, d):
    hf = copy(fx["hf"], d / "hf_bert")
    return [cli("bigs_jax.convert", hf, d / "out", "--from", "bogus")]


@case("convert: --from hf-gpt2 for a BERT directory", 1, "model_type 'bert', not 'gpt2'")
def convert_wrong_from(fx, d):
    hf = copy(fx["hf"], d / "hf_bert")
    return [cli("bigs_jax.convert", hf, d / "out", "--from", "hf-gpt2")]


@case("convert: HF config.json is not JSON", 1, "config.json")
def convert_malformed_config(fx, d):
    hf = copy(fx["hf"], d / "hf_bert")
    (hf / "config.json").write_text("{not json")
    return [cli("bigs_jax.convert", hf, d / "out")]


@case("convert: model.safetensors truncated", 1, "truncated")
def convert_truncated_weights(fx, d):
    hf = copy(fx["hf"], d / "hf_bert")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:len(data) // 2])
    return [cli("bigs_jax.convert", hf, d / "out")]


@case("convert: a BiGS workdir --to hf", 1, "no HF BERT equivalent")
def convert_bigs_to_hf(fx, d):
    run = copy(fx["run"], d / "run")
    return [cli("bigs_jax.convert", run, d / "out", "--to", "hf")]


@case("convert: --vocab-multiple 0", 1, "vocab")
def convert_vocab_multiple_zero(fx, d):
    hf = copy(fx["hf"], d / "hf_bert")
    return [cli("bigs_jax.convert", hf, d / "out", "--vocab-multiple", "0")]


@case("convert: DST on a full disk (RLIMIT_FSIZE)", 1, "free space on that disk")
def convert_full_disk(fx, d):
    hf = copy(fx["hf"], d / "hf_bert")
    return [cli("bigs_jax.convert", hf, d / "out", preexec=file_size_limit(20_000))]


# ---------------------------------------------------------------------------- data inspect


@case("data inspect: missing config file", 1, "does not exist")
def inspect_missing_config(fx, d):
    return [cli("bigs_jax.data", "inspect", "--config=configs/nope.py")]


@case("data inspect: config typo :smok", 1, "smok")
def inspect_config_typo(fx, d):
    return [cli("bigs_jax.data", "inspect", "--config=configs/quickstart.py:smok")]


@case("data inspect: unknown task name", 1, "embedded_mlmm")
def inspect_unknown_task(fx, d):
    return [cli("bigs_jax.data", "inspect", f"--config={S[9:]}", "--task=embedded_mlmm")]


@case("data inspect: task spec with a vocab path that does not exist", 1, "vocab.txt")
def inspect_bad_vocab(fx, d):
    (d / "corpus.txt").write_text("the cat sat on the mat .\n" * 50)
    spec = f"text_mlm:{d / 'corpus.txt'},vocab={d / 'nope' / 'vocab.txt'}"
    return [cli("bigs_jax.data", "inspect", f"--config={S[9:]}", f"--task={spec}")]


@case("data inspect: task spec whose files do not exist", 1, "")
def inspect_missing_files(fx, d):
    return [cli("bigs_jax.data", "inspect", f"--config={S[9:]}",
                f"--task=text_mlm:{d / 'no_such_*.txt'}")]


@case("data inspect: malformed task spec (item without =)", 1, "needs key=value")
def inspect_malformed_spec(fx, d):
    (d / "corpus.txt").write_text("the cat sat on the mat .\n" * 50)
    return [cli("bigs_jax.data", "inspect", f"--config={S[9:]}",
                f"--task=text_mlm:{d / 'corpus.txt'},pack")]


@case("data inspect: --batches 0", 1, "--batches must be >= 1")
def inspect_zero_batches(fx, d):
    return [cli("bigs_jax.data", "inspect", f"--config={S[9:]}", "--batches", "0")]


# ---------------------------------------------------------------------------- generate


def gen(fx, d, *args):
    gpt = copy(fx["gpt"], d / "gpt2")
    return [cli("bigs_jax.generate", gpt, *args)]


@case("generate: empty prompt", 1, "the prompt encodes to no tokens")
def gen_empty_prompt(fx, d):
    return gen(fx, d, "--prompt", "")


@case("generate: prompt longer than max_len", 1, "more than the model's max_len")
def gen_long_prompt(fx, d):
    return gen(fx, d, "--prompt", "the cat sat on the mat " * 400, "--max_new_tokens", "2")


@case("generate: --temperature 0", 1, "temperature must be > 0")
def gen_temperature_zero(fx, d):
    return gen(fx, d, "--prompt", "the cat", "--temperature", "0")


@case("generate: --temperature -1", 1, "temperature must be > 0")
def gen_temperature_negative(fx, d):
    return gen(fx, d, "--prompt", "the cat", "--temperature", "-1")


@case("generate: --top_p 1.5", 1, "top_p must be in (0, 1]")
def gen_top_p(fx, d):
    return gen(fx, d, "--prompt", "the cat", "--top_p", "1.5")


@case("generate: --num_beams 0", 1, "num_beams must be >= 1")
def gen_num_beams(fx, d):
    return gen(fx, d, "--prompt", "the cat", "--num_beams", "0")


@case("generate: --max_new_tokens 0", 1, "max_new_tokens must be >= 1")
def gen_max_new_tokens(fx, d):
    return gen(fx, d, "--prompt", "the cat", "--max_new_tokens", "0")


@case("generate: an encoder (MLM) workdir", 1, "is not a causal LM")
def gen_encoder(fx, d):
    run = copy(fx["run"], d / "run")
    return [cli("bigs_jax.generate", run, "--prompt", "the cat")]


@case("generate: a workdir that does not exist", 1, "does not exist")
def gen_missing(fx, d):
    return [cli("bigs_jax.generate", d / "missing", "--prompt", "the cat")]


@case("generate: --vocab that does not exist", 1, "")
def gen_missing_vocab(fx, d):
    return gen(fx, d, "--prompt", "the cat", "--vocab", str(d / "nope.model"))


# ---------------------------------------------------------------------------- faults


def kill_then_rerun(fx, d, sig):
    run = d / "run"
    argv = [S, "--config.train.steps=8", "--config.train.checkpoint_every=2",
            "--config.train.eval_every=4", f"--workdir={run}"]
    return [cli("train.py", *argv, kill=(sig, checkpoint(run, 2) / "commit_success.txt")),
            cli("train.py", *argv)]


@case("SIGTERM after the first checkpoint, then the same command again", 0, "done",
      disk=True)
def sigterm_then_rerun(fx, d):
    return kill_then_rerun(fx, d, signal.SIGTERM)


@case("SIGKILL after the first checkpoint, then the same command again", 0, "done",
      disk=True)
def sigkill_then_rerun(fx, d):
    return kill_then_rerun(fx, d, signal.SIGKILL)


@case("disk full during the first checkpoint write (RLIMIT_FSIZE)", 1,
      "failed (", disk=True)
def disk_full(fx, d):
    return [cli("train.py", S, *SHORT, f"--workdir={d / 'run'}",
                preexec=file_size_limit(300_000))]


@case("disk full while resuming a run (RLIMIT_FSIZE)", 1, "free space on that disk",
      disk=True)
def disk_full_resume(fx, d):
    run = copy(fx["run"], d / "run")
    return [cli("train.py", *RUN4, "--config.train.steps=6", f"--workdir={run}",
                preexec=file_size_limit(300_000))]


@case("read-only workdir (resume as a user without write access)", 1, "", disk=False)
def read_only_workdir(fx, d):
    run = copy(fx["run"], d / "run")
    for p in [run, *run.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    d.chmod(0o755)
    cmd = cli("train.py", *RUN4, "--config.train.steps=6", f"--workdir={run}",
              env={"JAX_COMPILATION_CACHE_DIR": None})  # the cache is not writable either
    cmd.argv = NO_OVERRIDE + cmd.argv
    return [cmd]


# ---------------------------------------------------------------------------- running


def hashes(path: Path) -> dict:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p):
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def changed_files(before: dict, after: dict) -> list[str]:
    return sorted([f"+{k}" for k in after.keys() - before.keys()]
                  + [f"-{k}" for k in before.keys() - after.keys()]
                  + [f"~{k}" for k in before.keys() & after.keys() if before[k] != after[k]])


def summarize(changes: list[str]) -> str:
    """'no' or e.g. '+12 run/checkpoints/…, ~run/config.json': counts per top-level dir."""
    if not changes:
        return "no"
    groups: dict = {}
    for c in changes:
        parts = c[1:].split(os.sep)
        key = c[0] + os.sep.join(parts[:3]) + ("/…" if len(parts) > 3 else "")
        groups[key] = groups.get(key, 0) + 1
    items = [f"{k} ({n})" if n > 1 else k for k, n in sorted(groups.items())]
    return ", ".join(items[:4]) + (f", … {len(items) - 4} more" if len(items) > 4 else "")


def execute(cmd: Cmd, env: dict, cwd: str, timeout: int = 600) -> tuple[int, str, str]:
    run_env = {k: v for k, v in {**env, **(cmd.env or {})}.items() if v is not None}
    p = subprocess.Popen(cmd.argv, cwd=cwd, env=run_env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=cmd.preexec)
    if cmd.kill:
        sig, trigger = cmd.kill
        deadline = time.time() + timeout
        while not os.path.exists(trigger) and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            p.send_signal(sig)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return p.returncode, out, err


def message_of(rc: int, out: str, err: str) -> tuple[str, bool]:
    """(what the user sees, whether it is one line with no traceback)."""
    lines = [l.strip() for l in err.replace("\r", "\n").splitlines() if l.strip()]
    if MARKER.strip() in [l.split(" ")[0] for l in lines] and lines:
        i = max(i for i, l in enumerate(lines) if l.startswith(MARKER))
        text = lines[i + 1:]
        return f"{lines[i][len(MARKER):]}: {' '.join(text)}", len(text) == 1
    traceback = "Traceback" in err
    if rc == 0:
        outs = [l.strip() for l in out.splitlines() if l.strip()]
        warn = [l for l in outs + lines if l.startswith("warning:")]
        return (warn[0] if warn else outs[-1] if outs else ""), not traceback
    if not lines:
        return f"(no message; killed by signal {-rc})" if rc < 0 else "(no message)", False
    last = lines[-1]
    errors = [l for l in lines if l.startswith("error:") or ": error:" in l]
    one = (not traceback and bool(errors) and errors[-1] == last
           and sum(l.startswith("error:") for l in lines) <= 1)
    return last, one


def run_case(c: Case, fx: dict, env: dict, base: Path) -> dict:
    d = Path(tempfile.mkdtemp(prefix=c.name + "_", dir=base))
    cmds = c.make(fx, d)
    for cmd in cmds:
        if cmd.setup:
            execute(cmd, env, ROOT)
    before = hashes(d)
    t0 = time.time()
    for cmd in cmds:
        if not cmd.setup:
            rc, out, err = execute(cmd, env, ROOT)
    after = hashes(d)
    message, one = message_of(rc, out, err)
    changes = changed_files(before, after)
    row = {"case": c.name, "what": c.what, "command": "; ".join(x.show for x in cmds),
           "rc": rc, "message": message, "one_line": one, "changed": changes,
           "seconds": round(time.time() - t0, 1),
           "expect": {"rc": c.rc, "message": c.expect, "disk": c.disk,
                      "one_line": c.one_line, "allow": list(c.allow)}}
    row["problems"] = problems(row)
    for p in d.rglob("*"):  # the read-only case leaves modes that rmtree cannot undo
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(d, ignore_errors=True)
    return row


def problems(row: dict) -> list[str]:
    """How a row differs from its case's expectation (empty: as expected)."""
    e, out = row["expect"], []
    if (row["rc"] == 0) != (e["rc"] == 0):
        out.append(f"exit code {row['rc']}, expected {'0' if e['rc'] == 0 else 'not 0'}")
    if e["one_line"] and not row["one_line"]:
        out.append("not one line")
    if e["message"] not in row["message"]:
        out.append(f"message lacks {e['message']!r}")
    changed = [c for c in row["changed"] if c not in e.get("allow", ())]
    if not e["disk"] and changed:
        out.append(f"changed {summarize(changed)}")
    return out


def table(rows: list[dict]) -> str:
    def cell(s) -> str:
        s = str(s).replace("|", "\\|").replace("\n", " ")
        return s if len(s) <= 400 else s[:397] + "..."
    head = ["#", "case", "command", "rc", "message the user sees", "one line",
            "disk changed?", "as expected"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        lines.append("| " + " | ".join(cell(x) for x in [
            i, f"**{r['case']}**: {r['what']}", f"`{r['command']}`", r["rc"], r["message"],
            "yes" if r["one_line"] else "**no**", summarize(r["changed"]),
            "yes" if not r["problems"] else "**no**: " + "; ".join(r["problems"])]) + " |")
    n = len(rows)
    failing = [r for r in rows if r["rc"] != 0]
    lines += ["", f"{n} cases; {sum(r['rc'] != 0 for r in rows)} refused, "
              f"{n - len(failing)} succeeded; one line: {sum(r['one_line'] for r in rows)}/{n}; "
              f"disk unchanged: {sum(not r['changed'] for r in rows)}/{n} "
              f"(changes expected in {sum(r['expect']['disk'] for r in rows)}); "
              f"failed runs that changed files: "
              f"{sum(bool(r['changed']) for r in failing)}; "
              f"as expected: {sum(not r['problems'] for r in rows)}/{n}"]
    return "\n".join(lines)


def probe_env(cache: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH", "")]))
    env.update({"JAX_PLATFORMS": "cpu", "USE_TF": "0", "HF_HUB_OFFLINE": "1",
                "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_COMPILATION_CACHE_DIR": cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
                "XLA_FLAGS": "--xla_backend_optimization_level=0"})
    return env


def run_probe(only=None, log=print) -> list[dict]:
    base = Path(tempfile.mkdtemp(prefix="bigs_jax_probe_"))
    try:
        cache = base / "xla_cache"
        env = probe_env(str(cache))
        cases = [c for c in CASES if not only or c.name in only]
        log(f"building fixtures in {base} ...")
        fx = build_fixtures(base / "fixtures", env)
        rows = []
        for i, c in enumerate(cases, 1):
            row = run_case(c, fx, env, base)
            rows.append(row)
            flag = "ok" if not row["problems"] else "UNEXPECTED: " + "; ".join(row["problems"])
            log(f"[{i}/{len(cases)}] {c.name} rc={row['rc']} {row['seconds']}s {flag}\n"
                f"    {row['message'][:300]}")
        return rows
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--only", help="comma-separated case names")
    args = p.parse_args()
    rows = run_probe(set(args.only.split(",")) if args.only else None,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
