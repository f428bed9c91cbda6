"""SCROLLS readers (official JSONL, tfds), task formats, causal-LM rows and greedy decoding."""

import json

import numpy as np
import pytest
from ml_collections import ConfigDict

import bigs_jax
from bigs_jax.evals import scrolls
from bigs_jax.evals.finetune import DataError
from tests.evals.glue_files import write_jsonl, write_vocab

QUALITY_INPUT = ("Why did the dog sit?\n\n(A) it is good\n(B) it is bad\n(C) not sure\n"
                 "(D) the man sat\n\nthe dog sat on the mat . the man runs .")


def config(tmp_path, task, **kw):
    d = {"source": "scrolls", "task": task, "format": "jsonl", "data_dir": str(tmp_path),
         "tfds_data_dir": "", "vocab_file": write_vocab(tmp_path / "vocab.txt"),
         "lower_case": True, "seq_len": 32, "eval_seq_len": 32, "batch_size": 2,
         "eval_batch_size": 2, "seed": 0, "scores_dir": "", "max_train_examples": 0,
         "max_eval_examples": 0, "max_target_len": 4}
    d.update(kw)
    return ConfigDict({"init": "", "data": d})


def test_jsonl_groups_references_and_parses_queries(tmp_path):
    rows = [{"id": "q1", "pid": "q1_0", "input": "who sat?\n\nthe dog sat .", "output": "dog"},
            {"id": "q1", "pid": "q1_1", "input": "who sat?\n\nthe dog sat .", "output": "a dog"},
            {"id": "q2", "pid": "q2_0", "input": "why?\n\nit is fun", "output": "fun"}]
    write_jsonl(tmp_path / "narrative_qa" / "validation.jsonl", rows)
    examples = scrolls.read(config(tmp_path, "narrative_qa"), "validation")
    assert [(e.id, e.outputs) for e in examples] == [("q1", ["dog", "a dog"]), ("q2", ["fun"])]
    assert scrolls.split_query("narrative_qa", rows[0]["input"]) == ("who sat?", "the dog sat .")
    assert scrolls.split_query("gov_report", "a\n\nb") == ("", "a\n\nb")
    query, doc = scrolls.split_query("quality", QUALITY_INPUT)
    assert query.endswith("(D) the man sat") and doc.startswith("the dog sat")
    assert scrolls.label_of("quality", QUALITY_INPUT, "not sure") == 2
    assert scrolls.label_of("contract_nli", "h\n\nd", "Contradiction") == 2
    assert scrolls.label_of("contract_nli", "h\n\nd", "maybe") == -1
    with pytest.raises(DataError, match="lists 2 options, expected"):
        scrolls.split_query("quality", "q?\n\n(A) x\n(B) y\n\ndoc")


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match=r"SCROLLS qasper: .*qasper/train.jsonl not found; put "
                                        r"the official files there"):
        scrolls.read(config(tmp_path, "qasper"), "train")
    (tmp_path / "qasper").mkdir()
    (tmp_path / "qasper" / "train.jsonl").write_text('{"id": "1", "input": "x"}\n')
    with pytest.raises(DataError, match="line 1 is not a JSON object with id, input and output"):
        scrolls.read(config(tmp_path, "qasper"), "train")
    with pytest.raises(DataError, match="unknown SCROLLS task 'quality_hard'"):
        scrolls.get_task("quality_hard")
    with pytest.raises(DataError, match="gov_report is a generation task: pass a causal model"):
        scrolls.check_model("gov_report", bigs_jax.models.make_config("bert-tiny"))


def test_contract_nli_source_scores_exact_match(tmp_path):
    train = [{"id": f"t{i}", "pid": f"t{i}", "input": f"it is fun\n\nthe dog sat {i}",
              "output": scrolls.CONTRACT_NLI_LABELS[i % 3]} for i in range(5)]
    dev = [{"id": "d1", "pid": "d1", "input": "a\n\nb", "output": "Entailment"},
           {"id": "d2", "pid": "d2", "input": "c\n\nd", "output": "Not mentioned"},
           {"id": "d2", "pid": "d2b", "input": "c\n\nd", "output": "Contradiction"},
           {"id": "d3", "pid": "d3", "input": "e\n\nf", "output": "Contradiction"}]
    write_jsonl(tmp_path / "contract_nli" / "train.jsonl", train)
    write_jsonl(tmp_path / "contract_nli" / "validation.jsonl", dev)
    cfg = config(tmp_path, "contract_nli", scores_dir=str(tmp_path / "run"))
    source = scrolls.data_source(cfg)
    assert source.model_overrides()["num_labels"] == 3
    np.testing.assert_array_equal(source.train.labels, [0, 1, 2, 0, 1])
    _, evals = source.iterators(0)
    np.testing.assert_array_equal(evals[1]["example_weights"], [1, 0])
    # Predict Entailment, Contradiction, Entailment: d1 right, d2 right (second reference).
    calls = iter([np.eye(3)[[1, 2]], np.eye(3)[[1, 1]]])
    out = source.score(3, lambda b: next(calls))
    assert out == {"contract_nli/exact_match": pytest.approx(200 / 3)}
    saved = json.load(open(tmp_path / "run" / "dev" / "step_3.json"))
    assert saved["predictions"] == {"d1": "Entailment", "d2": "Contradiction",
                                    "d3": "Entailment"}


def test_lm_rows_put_the_loss_on_the_output(tmp_path):
    from bigs_jax.evals.finetune import vocabulary

    vocab = vocabulary(config(tmp_path, "gov_report"))
    rows = scrolls.lm_rows(vocab, ["the cat sat"], ["a dog"], seq_len=8, max_target_len=3)
    cat, sat, a, dog, the, sep = (vocab.encode(w)[0] for w in
                                  ("cat", "sat", "a", "dog", "the", "[SEP]"))
    sep = vocab.special_ids.sep_id
    # prompt "the cat sat [SEP]", target "a dog [SEP]": inputs are the sequence minus its end.
    np.testing.assert_array_equal(rows["input_ids"][0], [the, cat, sat, sep, a, dog, 0, 0])
    np.testing.assert_array_equal(rows["labels"][0], [cat, sat, sep, a, dog, sep, 0, 0])
    np.testing.assert_array_equal(rows["loss_weights"][0], [0, 0, 0, 1, 1, 1, 0, 0])
    # A long prompt is cut so that the longest target still fits: seq_len + 1 - 3 - 1 = 5
    # prompt tokens ([SEP] included), then "a dog [SEP]".
    rows = scrolls.lm_rows(vocab, ["the cat sat on the mat"], ["a dog"], seq_len=8,
                           max_target_len=3)
    on = vocab.encode("on")[0]
    np.testing.assert_array_equal(rows["input_ids"][0], [the, cat, sat, on, sep, a, dog, 0])
    np.testing.assert_array_equal(rows["labels"][0], [cat, sat, on, sep, a, dog, sep, 0])


def test_greedy_decode_equals_unpadded_step_by_step():
    """Batched, padded, fixed-shape decoding = decoding each prompt alone without padding."""
    import jax

    model = bigs_jax.create("gpt2-tiny", vocab_size=40, seed=3)
    prompts = [[5, 6, 7], [9], [11, 12, 13, 14]]
    got = scrolls.greedy_decode(model, prompts, max_new_tokens=4, eos_id=-1, seq_len=16,
                                batch_size=2)
    last_logits = jax.jit(lambda ids: model(ids).logits[0, -1])
    for prompt, out in zip(prompts, got):
        seq = list(prompt)
        for _ in range(4):
            seq.append(int(np.asarray(last_logits(np.array([seq]))).argmax()))
        assert out == seq[len(prompt):]
    # Stopping at eos: the eos token ends a row and is not part of its output.
    first = got[0][0]
    stopped = scrolls.greedy_decode(model, prompts[:1], max_new_tokens=4, eos_id=first,
                                    seq_len=16, batch_size=2)
    assert stopped == [[]]


def test_cached_decode_equals_recompute_and_beam_runs():
    """`decode` (the cached generate, used by finish) gives greedy_decode's tokens; the eos
    ends a row without being part of it; beam search goes through the same path."""
    model = bigs_jax.create("gpt2-tiny", vocab_size=40, seed=3)
    prompts = [[5, 6, 7], [9], [11, 12, 13, 14]]
    reference = scrolls.greedy_decode(model, prompts, max_new_tokens=5, eos_id=-1, seq_len=16,
                                      batch_size=2)
    assert scrolls.decode(model, prompts, max_new_tokens=5, eos_id=-1,
                          batch_size=2) == reference
    eos = reference[1][2]
    cut = [r[:r.index(eos)] if eos in r else r for r in reference]
    assert scrolls.decode(model, prompts, max_new_tokens=5, eos_id=eos, batch_size=2) == cut
    beams = scrolls.decode(model, prompts, max_new_tokens=5, eos_id=eos, batch_size=2,
                           num_beams=3)
    assert len(beams) == 3 and all(len(b) <= 5 and eos not in b for b in beams)


def test_tfds_builder_path_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = config(tmp_path, "gov_report", format="tfds", tfds_data_dir=str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=5):
        source = scrolls.data_source(cfg)
        assert source.train["input_ids"].shape == (5, 32)
        train, evals = source.iterators(0)
        batch = next(train)
        assert batch["loss_weights"].sum() > 0
        assert len(evals) == 3 and evals[2]["loss_weights"][1].sum() == 0  # padding row
        assert scrolls.train_size(cfg) == 5
    with pytest.raises(DataError, match=r"tfds dataset scrolls/gov_report \(split train\) is "
                                        r"not prepared in .*tfds"):
        scrolls.data_source(cfg)
