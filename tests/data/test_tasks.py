"""Task registration: names, features, idempotence, clear errors."""

import pytest
import seqio

from bigs_jax.data import tasks, vocab


def test_embedded_tasks_are_registered_with_the_embedded_vocabulary():
    mlm = seqio.get_mixture_or_task("embedded_mlm")
    lm = seqio.get_mixture_or_task("embedded_lm")
    assert set(mlm.output_features) == {"input_ids"}
    assert set(lm.output_features) == {"input_ids", "labels"}
    for task in (mlm, lm):
        assert task.splits == ("train", "validation")
        for feature in task.output_features.values():
            assert feature.vocabulary == vocab.embedded_vocabulary()
            assert not feature.add_eos


def test_registration_is_idempotent():
    before = (seqio.get_mixture_or_task("embedded_mlm"), seqio.get_mixture_or_task("embedded_lm"))
    assert tasks.register_embedded_tasks() == before


def test_name_clash_and_bad_objective_fail_clearly(tmp_path):
    other = vocab.sentencepiece_vocabulary(vocab.EMBEDDED_MODEL_PATH)
    copy = tmp_path / "copy.model"
    copy.write_bytes(vocab.EMBEDDED_MODEL_PATH.read_bytes())
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_text_task(
            "embedded_mlm", tasks.embedded_source(), objective="lm", vocabulary=other
        )
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_text_task(
            "embedded_mlm",
            tasks.embedded_source(),
            objective="mlm",
            vocabulary=vocab.sentencepiece_vocabulary(copy),
        )
    with pytest.raises(ValueError, match="Unknown objective 'span'"):
        tasks.register_text_task("x", tasks.embedded_source(), objective="span", vocabulary=other)


def test_tasks_for_another_vocabulary_get_their_own_names(tmp_path):
    copy = tmp_path / "copy.model"
    copy.write_bytes(vocab.EMBEDDED_MODEL_PATH.read_bytes())
    mlm, lm = tasks.register_embedded_tasks(
        vocab.sentencepiece_vocabulary(copy), mlm_name="copy_mlm", lm_name="copy_lm"
    )
    try:
        assert mlm.name == "copy_mlm" and lm.name == "copy_lm"
        assert mlm.output_features["input_ids"].vocabulary.sentencepiece_model_file == str(copy)
    finally:
        seqio.TaskRegistry.remove("copy_mlm")
        seqio.TaskRegistry.remove("copy_lm")
