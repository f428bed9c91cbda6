"""Hand-made GLUE files in the official layouts (download_glue_data.py), SCROLLS-style JSONL
files, and a tiny vocab."""

import json
import os

WORDS = ("a the cat dog sat on mat it is good bad movie fun not sure who what why man woman "
         "runs play ##s ##ing . , ? ! yes no").split()


def write_vocab(path) -> str:
    with open(path, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return str(path)


def write_jsonl(path, rows) -> None:
    """One JSON object per line (the SCROLLS files' layout); creates the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write(root, folder, name, lines, header=None):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    with open(os.path.join(root, folder, name), "w", encoding="utf-8") as f:
        if header is not None:
            f.write(header + "\n")
        for line in lines:
            f.write("\t".join(line) + "\n")


def write_glue(root) -> str:
    """Every task's train and dev files; 8 train rows, 4 dev rows (MNLI: 4 + 3)."""
    root = str(root)
    sents = ["the cat sat on the mat .", "a dog runs", "good movie !", "bad movie , not fun",
             "who is the man ?", "what a woman", "it is fun", "the dog sat"]
    _write(root, "CoLA", "train.tsv", [("gj04", str(i % 2), "", s) for i, s in enumerate(sents)])
    _write(root, "CoLA", "dev.tsv", [("gj04", str(i % 2), "*" * (1 - i % 2), s)
                                     for i, s in enumerate(sents[:4])])
    for split, rows in (("train", sents), ("dev", sents[:4])):
        _write(root, "SST-2", f"{split}.tsv", [(s + " ", str(i % 2)) for i, s in enumerate(rows)],
               "sentence\tlabel")
        # MRPC's header starts with a byte-order mark in the released files.
        _write(root, "MRPC", f"{split}.tsv",
               [(str(i % 2), str(100 + i), str(200 + i), s, sents[-1 - i])
                for i, s in enumerate(rows)], "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String")
        _write(root, "STS-B", f"{split}.tsv",
               [(str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", s,
                 sents[-1 - i], f"{i * 0.625:.3f}") for i, s in enumerate(rows)],
               "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
               "\tscore")
        qqp = [(str(i), str(2 * i), str(2 * i + 1), s, sents[-1 - i], str(i % 2))
               for i, s in enumerate(rows)]
        if split == "train":
            qqp.insert(3, ("999", "1", "2", "a broken line without the other columns"))
        _write(root, "QQP", f"{split}.tsv", qqp,
               "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate")
        _write(root, "QNLI", f"{split}.tsv",
               [(str(i), s, sents[-1 - i], ("entailment", "not_entailment")[i % 2])
                for i, s in enumerate(rows)], "index\tquestion\tsentence\tlabel")
        for folder, labels in (("RTE", ("entailment", "not_entailment")), ("WNLI", ("0", "1"))):
            _write(root, folder, f"{split}.tsv",
                   [(str(i), s, sents[-1 - i], labels[i % 2]) for i, s in enumerate(rows)],
                   "index\tsentence1\tsentence2\tlabel")
    nli = ("entailment", "neutral", "contradiction")
    head = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
            "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")

    def mnli(rows, n_labels, shift):
        return [(str(i), "1", f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s,
                 sents[-1 - i], *[nli[(i + shift) % 3]] * n_labels)
                for i, s in enumerate(rows)]

    _write(root, "MNLI", "train.tsv", mnli(sents, 2, 0), head + "\tlabel1\tgold_label")
    dev_head = head + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
    _write(root, "MNLI", "dev_matched.tsv", mnli(sents[:4], 6, 1), dev_head)
    _write(root, "MNLI", "dev_mismatched.tsv", mnli(sents[4:7], 6, 2), dev_head)
    return root
