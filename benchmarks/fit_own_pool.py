"""Does fitting the default to a user's own task labels help on *unseen* labels of that taxonomy, at no IEB cost?

The default pool's 77 tasks (``metadata.task``) are split in two halves by sorted name (even / odd
positions). ``icl-retriever train HALF_A --label-field task`` (from the shipped default, whole labels held
out for validation, early stopping, distillation to the start) fits a model on half A; we then measure

- leave-one-out task P@1 on half B (tasks the fit never saw) and on half A (the ones it saw), and
- IEB eft_test P@1 (``../shared/data/ieb/eft_test.json``, when present), which must not drop by more than 0.01,

for the shipped default and the fitted model. The same split is then run the other way round. With the
training files beside the checkout, it also prints the shipped model's own validation (its training card's
held-out IEB silver and SNI tasks and sni_dev, never a test set) for both: the guard that a fitting recipe may be
chosen on, where eft_test may not.

Run: python -m benchmarks.fit_own_pool [--steps 60] [--batch-size 16] [--lr 1e-5] [--distill 20.0] [--lora-rank R]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT / "examples" / "demos.jsonl"
EFT_TEST = ROOT.parent / "shared" / "data" / "ieb" / "eft_test.json"


def _halves() -> tuple[list[str], list[str]]:
    lines = [line for line in POOL.read_text(encoding="utf-8").splitlines() if line.strip()]
    tasks = sorted({json.loads(line)["metadata"]["task"] for line in lines})
    first = set(tasks[0::2])
    return [x for x in lines if json.loads(x)["metadata"]["task"] in first], [
        x for x in lines if json.loads(x)["metadata"]["task"] not in first
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--distill", type=float, default=20.0)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=0, help="fit low-rank adapters instead of all weights")
    args = ap.parse_args()

    from icl_retriever import PIEEncoder, default_model
    from icl_retriever.evaluation import evaluate
    from icl_retriever.training import TrainConfig, train, validate

    card_config = json.loads((default_model.HERE / "training_card.json").read_text(encoding="utf-8"))["config"]
    card_config["train_files"] = [ROOT / p for p in card_config["train_files"]]  # relative to the checkout
    card_config["val_files"] = [ROOT / p for p in card_config["val_files"]]
    guard_config = TrainConfig.model_validate(card_config)
    with_guard = all(Path(p).is_file() for p in [*guard_config.train_files, *guard_config.val_files])

    def guard(encoder: PIEEncoder) -> str:
        if not with_guard:
            return "-"
        m = validate(encoder, guard_config)
        return (f"{m['eft_train_silver.p_at_1']:.4f} / {m['sni_train.cross_group_p_at_1']:.4f} / "
                f"{m['sni_dev.cross_group_p_at_1']:.4f} -> {m['score']:.4f}")

    halves = _halves()
    print("| trained on | model | P@1 unseen half | P@1 seen half | IEB eft_test P@1 | shipped validation: held-out IEB"
          " / held-out SNI x-dataset / sni_dev x-dataset -> score | the fit's validation (held-out labels of the half):"
          " before -> best | steps | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, lines in enumerate(halves):
            files.append(Path(tmp) / f"half_{'AB'[i]}.jsonl")
            files[-1].write_text("\n".join(lines) + "\n", encoding="utf-8")

        def scores(encoder: PIEEncoder, seen: Path, unseen: Path) -> tuple[float, float, float | None]:
            kw = {"show_progress_bar": False}
            unseen_p = evaluate(encoder, pool_path=unseen, **kw).pool_p_at_1
            seen_p = evaluate(encoder, pool_path=seen, **kw).pool_p_at_1
            ieb = evaluate(encoder, EFT_TEST, **kw).p_at_1 if EFT_TEST.is_file() else None
            return unseen_p or 0.0, seen_p or 0.0, ieb

        default = PIEEncoder()
        default_guard = guard(default)
        for i in (0, 1):
            seen, unseen = files[i], files[1 - i]
            base = scores(default, seen, unseen)
            start = time.perf_counter()
            out = train(
                TrainConfig(
                    train_files=[seen], label_field="task", output_dir=Path(tmp) / f"fit_{i}", base_model="default",
                    steps=args.steps, batch_size=args.batch_size, lr=args.lr, distill=args.distill,
                    eval_every=args.eval_every, patience=args.patience, val_fraction=0.2, symmetric=True,
                    lora_rank=args.lora_rank,
                ),
                show_progress_bar=False,
            )
            seconds = time.perf_counter() - start
            card = json.loads((out / "training_card.json").read_text(encoding="utf-8"))
            fitted_encoder = PIEEncoder(out)
            fitted = scores(fitted_encoder, seen, unseen)
            own = f"{card['validation_before']['score']:.4f} -> {card['validation']['score']:.4f}"
            rows = (("shipped default", base, default_guard, "-", "-"),
                    ("fitted", fitted, guard(fitted_encoder), own, card["steps_done"]))
            for name, (u, s, ieb), g, v, steps in rows:
                ieb_text = "-" if ieb is None else f"{ieb:.4f}"
                print(f"| half {'AB'[i]} | {name} | {u:.4f} | {s:.4f} | {ieb_text} | {g} | {v} | {steps} | "
                      + (f"{seconds:.0f} |" if name == "fitted" else "- |"), flush=True)


if __name__ == "__main__":
    main()
