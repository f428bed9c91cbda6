"""Helper run in a subprocess by test_sharding.py: per-step losses of a smoke run on a mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.train.mesh_losses \
        MODEL DATA,FSDP,TENSOR[;DATA,FSDP,TENSOR...] STEPS WORKDIR \
        [COORDINATOR NUM_PROCESSES PROCESS_ID]
prints one JSON line {"losses": [...], "devices": n, "first_batch_rows": [...]} per mesh, in
order (several meshes run one after the other in this process, in WORKDIR/0, WORKDIR/1, ...).
MESH_LOSSES_SET='{"data.streaming": true, "objective": "lm", ...}' overrides config fields
(dotted names, or top-level ones).
"""

import json
import os
import sys

import jax

from bigs_jax.data import seqio_source
from bigs_jax.train import loop
from configs import quickstart


def main(model: str, meshes: str, steps: str, workdir: str, coordinator: str = "",
         num_processes: str = "1", process_id: str = "0") -> None:
    if coordinator:
        from bigs_jax.train import partitioning

        partitioning.initialize_distributed(coordinator, int(num_processes), int(process_id),
                                            timeout_s=120)
    meshes = meshes.split(";")
    for i, mesh in enumerate(meshes):
        run(model, mesh, steps, workdir if len(meshes) == 1 else os.path.join(workdir, str(i)))


def run(model: str, mesh: str, steps: str, workdir: str) -> None:
    config = quickstart.get_config("smoke")
    config.model.name = model
    if model.startswith("m2-"):  # M2 has neither attention heads nor an SSM state size
        del config.model["ssm_state"]
    else:
        config.model.num_heads = 4
    config.mesh.shape = tuple(int(x) for x in mesh.split(","))
    config.train.steps = int(steps)
    config.train.log_every = 1
    # A schedule that does not depend on the run length, so a run continued to more steps
    # takes the same updates as one planned that long.
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.optim.lr = 1e-3
    config.train.eval_every = int(steps)
    config.train.checkpoint_every = int(steps)
    for name, value in json.loads(os.environ.get("MESH_LOSSES_SET", "{}")).items():
        *section, key = name.split(".")
        (config[section[0]] if section else config)[key] = value
    summary = loop.train_and_evaluate(config, workdir)
    losses = [summary["train_loss"][s] for s in sorted(summary["train_loss"])]
    first = next(seqio_source.make_data(config, start_step=0)[0])["input_ids"]
    print(json.dumps({"losses": losses, "devices": jax.device_count(),
                      "eval": summary["eval_loss"][int(steps)],
                      "first_batch_rows": first[:, :4].tolist()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
