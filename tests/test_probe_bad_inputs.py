"""Issue 17's table cannot rot: every bad input and fault of tests/probe_bad_inputs.py ends as
its case declares (exit code, one line, the message, files left alone), and the probe's own
reading of a process's output tells a traceback from a one-line error."""

import pytest

from tests import probe_bad_inputs as probe


def test_the_probe_reads_messages_and_changes_as_a_user_would():
    traceback = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "ValueError: boom\n")
    assert probe.message_of(1, "", traceback) == ("ValueError: boom", False)
    assert probe.message_of(1, "", "I0000 log line\nerror: bad flag\n") == ("error: bad flag",
                                                                           True)
    assert probe.message_of(1, "", "error: first\nerror: second\n")[1] is False
    assert probe.message_of(1, "", "error: key map\n  missing: a\n") == ("missing: a", False)
    assert probe.message_of(2, "", "usage: prog [-h]\nprog: error: argument --x\n") == (
        "prog: error: argument --x", True)
    assert probe.message_of(0, "step 2\ndone: 2 steps\n", "0%|\r100%|\n") == ("done: 2 steps",
                                                                             True)
    assert probe.message_of(0, "warning: step 4 is damaged\ndone\n", "") == (
        "warning: step 4 is damaged", True)
    assert probe.message_of(1, "", "--- KeyError\n'a'\nmore\n") == ("KeyError: 'a' more",
                                                                    False)
    assert probe.message_of(-9, "", "") == ("(no message; killed by signal 9)", False)
    before, after = {"a": "1", "b/c": "2", "d": "3"}, {"a": "1", "b/c": "9", "e": "4"}
    assert probe.changed_files(before, after) == ["+e", "-d", "~b/c"]
    row = {"rc": 0, "one_line": True, "message": "done", "changed": ["~b/c"],
           "expect": {"rc": 1, "message": "error", "disk": False, "one_line": True}}
    assert probe.problems(row) == ["exit code 0, expected not 0", "message lacks 'error'",
                                   "changed ~b/c"]


def test_the_probe_covers_the_issue():
    names = {c.name for c in probe.CASES}
    assert len(names) == len(probe.CASES) >= 45
    for item in ("foreign_hf_workdir", "damaged_truncated", "damaged_no_metadata",
                 "damaged_no_params", "damaged_no_checkpoint_metadata", "api_ids_too_large",
                 "api_ids_negative", "api_token_types_too_large", "glue_eval_of_train_workdir",
                 "typo_smok", "typo_sise", "negative_steps", "resume_changed_lr",
                 "resume_changed_batch", "sigterm_then_rerun", "disk_full",
                 "read_only_workdir"):
        assert item in names, item


@pytest.mark.slow  # ~100 processes: 10-30 minutes on 2 cores
def test_every_bad_input_and_fault_ends_as_its_case_declares():
    rows = probe.run_probe()
    assert len(rows) == len(probe.CASES)
    wrong = [f"{r['case']}: {'; '.join(r['problems'])} (rc {r['rc']}: {r['message'][:300]})"
             for r in rows if r["problems"]]
    assert not wrong, "\n".join(wrong)
