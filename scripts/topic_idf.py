"""Compute the word-piece IDF table of the default model's static topic vectors (provenance of
``icl_retriever/default_model/topic_idf.npy``).

Documents: every instruction of ``eft_train_unsup.json`` (IEB's unlabelled training instructions) and every
task definition of ``sni_train.json`` with its example input on the next line, training files only.
Document frequency counts a word piece once per document; ``idf = ln((N + 1) / (df + 1)) + 1``.

    python scripts/topic_idf.py ../shared/data/ieb/eft_train_unsup.json ../shared/data/sni/sni_train.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from icl_retriever.encoder.static import IDF_FILE, MAX_TOKENS, idf_table, load_table


def documents(unsup: Path, sni: Path) -> list[str]:
    docs = [str(t) for t in json.loads(unsup.read_text(encoding="utf-8"))]
    for task in json.loads(sni.read_text(encoding="utf-8")).values():
        docs += [s["instruction"] + ("\n" + s["input"] if s.get("input") else "") for s in task["samples"]]
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("unsup", type=Path, help="eft_train_unsup.json")
    ap.add_argument("sni", type=Path, help="sni_train.json")
    ap.add_argument("--out", type=Path, default=IDF_FILE)
    args = ap.parse_args()
    docs = documents(args.unsup, args.sni)
    table, tokenizer = load_table("default-base")
    tokenizer.enable_truncation(MAX_TOKENS)
    idf = idf_table([e.ids for e in tokenizer.encode_batch(docs, add_special_tokens=False)], len(table))
    np.save(args.out, idf)
    print(f"{len(docs)} documents -> {args.out} ({idf.shape[0]} word pieces, idf {idf.min():.2f}..{idf.max():.2f})")


if __name__ == "__main__":
    main()
