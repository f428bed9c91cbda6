"""SeqIO mixtures of pretraining tasks, and the published recipes over tfds corpora.

    from bigs_jax.data import mixtures
    name = mixtures.register_recipe("bigs", data_dir="gs://bucket/tfds")   # "bigs_mlm"
    it = pipeline.make_iterator(name, split="train", batch_size=760, seq_len=128, seed=0)

A mixture is a `seqio.Mixture` ((task, rate) pairs in SeqIO's registry); `pipeline` samples it
by global example position, so a stream is deterministic given the seed, resumes exactly and
splits across hosts like a single task (see `pipeline`). SeqIO's own `Mixture.get_dataset`
interleaves with `tf.data` sampling, which resumes only by replaying the stream.

Recipes (config: `--config.data.task=mix_mlm:recipe=bigs,data_dir=DIR`):

- `bigs`: the BiGS / BERT corpus, Wikipedia + books (research/bigs.md §1.8). BookCorpus is not
  in tfds; PG-19 books stand in. Rates follow BERT's corpus sizes (2,500M Wikipedia words,
  800M BookCorpus words): 0.76 / 0.24.
- `m2_long`: M2-BERT's long-context mix (research/m2.md §2.5): C4 10%, C4 concatenated 24%,
  Wikipedia 10%, Wikipedia concatenated 23%, Books3 10%, Books3 concatenated 23% (PG-19 for
  Books3). "Concatenated" rows are cut from the stream of documents; the others hold one
  document each, which here means packed rows with segment ids (the same isolation as one
  padded document per row, without the padding).
"""

from __future__ import annotations

import hashlib

import seqio

from bigs_jax.data import tasks

WIKIPEDIA = "wikipedia/20230601.en"
BOOKS = "pg19"
C4 = "c4/en"

# recipe -> [(tfds name, packed?, rate)]
RECIPES = {
    "bigs": [(WIKIPEDIA, False, 0.76), (BOOKS, False, 0.24)],
    "m2_long": [
        (C4, True, 0.10), (C4, False, 0.24),
        (WIKIPEDIA, True, 0.10), (WIKIPEDIA, False, 0.23),
        (BOOKS, True, 0.10), (BOOKS, False, 0.23),
    ],
}


_SPEC_MIXTURES: dict[str, str] = {}  # mixture spec -> registered mixture name


def get_task(name: str) -> seqio.Task | seqio.Mixture:
    """What `config.data.task` can name: a registered task or mixture, a task spec
    (`tasks.get_task`), or a mixture spec, registered on first use:

        mix_mlm:recipe=bigs,data_dir=gs://bucket/tfds,vocab=/path/vocab.txt

    Raises:
        ValueError: on an unknown name or recipe, or a malformed spec.
    """
    if name in _SPEC_MIXTURES:
        return seqio.MixtureRegistry.get(_SPEC_MIXTURES[name])
    if not name.startswith("mix_") or name in seqio.MixtureRegistry.names():
        return tasks.get_task(name)
    _, objective, _, options = tasks.parse_spec(name)
    mixture = register_recipe(options.get("recipe", ""), objective=objective,
                              data_dir=options.get("data_dir"), vocab=options.get("vocab"))
    _SPEC_MIXTURES[name] = mixture
    return seqio.MixtureRegistry.get(mixture)


def register_mixture(name: str, tasks_and_rates: list[tuple[str, float]]) -> seqio.Mixture:
    """Registers (once) a `seqio.Mixture` of tasks or task specs (`tasks.get_task`) with rates.

    Rates are relative (normalized by their sum). All tasks must share the objective and the
    vocabulary; packed and unpacked tasks may mix.
    """
    if not tasks_and_rates or any(rate <= 0 for _, rate in tasks_and_rates):
        raise ValueError(f"Mixture {name!r} needs tasks with positive rates, got "
                         f"{tasks_and_rates}.")
    members = [(tasks.get_task(spec), rate) for spec, rate in tasks_and_rates]
    first = members[0][0].output_features
    if any(("labels" in t.output_features) != ("labels" in first)
           or t.output_features["input_ids"].vocabulary != first["input_ids"].vocabulary
           for t, _ in members):
        raise ValueError(f"Mixture {name!r} mixes objectives or vocabularies; its tasks must "
                         "all be MLM or all LM, with one vocabulary.")
    if name in seqio.MixtureRegistry.names():
        existing = seqio.MixtureRegistry.get(name)
        if [(t.name, existing.get_rate(t)) for t in existing.tasks] != sorted(
                [(t.name, float(r)) for t, r in members]):
            raise ValueError(f"Mixture {name!r} is already registered with other tasks or "
                             "rates; register this one under another name.")
        return existing
    return seqio.MixtureRegistry.add(name, [(t.name, rate) for t, rate in members])


def register_recipe(
    recipe: str,
    *,
    data_dir: str | None,
    objective: str = "mlm",
    vocab: str | None = None,
    name: str | None = None,
) -> str:
    """Registers a recipe of `RECIPES` over tfds builders in `data_dir`; returns its name.

    Args:
        recipe: "bigs" or "m2_long".
        data_dir: tfds data directory with the prepared builders (see `sources.tfds_source`).
        objective: "mlm" or "lm".
        vocab: vocabulary path (vocab.txt for WordPiece), None for the embedded one.
        name: mixture name; defaults to "<recipe>_<objective>" plus a hash of the arguments.
    """
    if recipe not in RECIPES:
        raise ValueError(f"Unknown mixture recipe {recipe!r}; use one of {sorted(RECIPES)}.")
    options = "".join(f",{k}={v}" for k, v in (("data_dir", data_dir), ("vocab", vocab)) if v)
    members = [(f"tfds_{objective}:name={tfds_name}{options}{',pack=1' if packed else ''}", rate)
               for tfds_name, packed, rate in RECIPES[recipe]]
    if name is None:
        digest = hashlib.sha256(repr((data_dir, vocab)).encode()).hexdigest()[:8]
        name = f"{recipe}_{objective}_{digest}"
    register_mixture(name, members)
    return name
