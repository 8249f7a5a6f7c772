"""Training: task files, triplet batches, the masked InfoNCE loss, and a 3-step run with the real model."""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from icl_retriever import PIEEncoder, PoolError, calibration
from icl_retriever.default_model import apply_delta, base_model_dir
from icl_retriever.training import (
    TrainConfig,
    TrainingCard,
    TripletSampler,
    info_nce,
    load_task_set,
    load_tasks,
    parse_facets,
    split_tasks,
    train,
    triplet_loss,
    validate,
    validation_hits,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_IEB = FIXTURES / "tiny_ieb.json"
TINY_JSONL = FIXTURES / "tiny_tasks.jsonl"
TINY_SNI = FIXTURES / "tiny_sni.json"
DEFAULT_POOL = Path(__file__).resolve().parents[1] / "examples" / "demos.jsonl"
IEB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ieb"
needs_ieb = pytest.mark.skipif(not IEB.exists(), reason="needs ../shared/data/ieb")
#: Fixture tasks sharing neither verb nor noun with another task: they get random negatives.
LONE_TASKS = {"generate|sql", "translate|sentence##convert|sentence"}
PROBE = ["Write a poem about the moon.", "Translate 'thank you' into Dutch.", "Classify this review's sentiment."]


# ------------------------------------------------------------------------------------------- files


def test_load_tasks_ieb_fixture() -> None:
    tasks = load_task_set(TINY_IEB)
    assert len(tasks.instructions) == 8
    assert all(len(v) == 6 for v in tasks.instructions.values())
    assert tasks.facets["translate|sentence##convert|sentence"] == (
        frozenset({"translate", "convert"}),
        frozenset({"sentence"}),
    )


def test_load_tasks_jsonl_dedupes_and_keeps_plain_labels() -> None:
    tasks = load_task_set(TINY_JSONL)
    assert load_tasks(TINY_JSONL) == tasks.instructions
    assert len(tasks.instructions["sort|list"]) == 3  # one duplicate line dropped
    assert tasks.facets["humor"] == (frozenset(), frozenset())
    assert tasks.facets["sort|word"] == (frozenset({"sort"}), frozenset({"word"}))


@pytest.mark.parametrize(
    ("line", "message"),
    [("{broken", "not valid JSON"), ('{"instruction": "x"}', '"task"'), ('{"task": "a|b"}', '"instruction"')],
)
def test_load_tasks_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "ok", "task": "a|b"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(PoolError, match=message) as info:
        load_tasks(path)
    assert (info.value.path, info.value.line) == (str(path), 3)


def test_load_tasks_ieb_errors_name_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"a|b": {"samples": [{"instruction": "x", "category": "a"}]}}', encoding="utf-8")
    with pytest.raises(PoolError, match=r"bad\.json.*category"):
        load_tasks(path)


def test_parse_facets() -> None:
    assert parse_facets("Write|Poem") == (frozenset({"write"}), frozenset({"poem"}))
    assert parse_facets("get|point##find|point") == (frozenset({"get", "find"}), frozenset({"point"}))
    assert parse_facets("humor") == (frozenset(), frozenset())


def test_split_holds_out_whole_tasks_reproducibly() -> None:
    tasks = load_task_set(TINY_IEB)
    train_set, val_set = split_tasks(tasks, 0.1, seed=0)
    assert val_set is not None and len(val_set.instructions) == 2  # at least two, for ARI
    assert set(train_set.instructions).isdisjoint(val_set.instructions)
    assert len(train_set.instructions) + len(val_set.instructions) == 8
    assert split_tasks(tasks, 0.1, seed=0)[1] == val_set
    assert split_tasks(tasks, 0.0, seed=0) == (tasks, None)


# ----------------------------------------------------------------------------------------- batches


def _sampler(seed: int = 0) -> TripletSampler:
    tasks = load_task_set(TINY_IEB)
    return TripletSampler(tasks.instructions, tasks.facets, seed=seed)


def test_triplets_have_same_task_positives_and_related_hard_negatives() -> None:
    tasks = load_task_set(TINY_IEB)
    sampler = TripletSampler(tasks.instructions, tasks.facets, seed=0)
    for _ in range(10):
        for t in sampler.batch(8):
            assert t.anchor != t.positive
            assert {t.anchor, t.positive} <= set(tasks.instructions[t.task])
            assert t.negative in tasks.instructions[t.neg_task]
            assert t.neg_task != t.task
            if t.task not in LONE_TASKS:
                (verbs, nouns), (neg_verbs, neg_nouns) = tasks.facets[t.task], tasks.facets[t.neg_task]
                assert verbs & neg_verbs or nouns & neg_nouns, (t.task, t.neg_task)


def test_task_without_relatives_gets_a_random_other_task() -> None:
    sampler = _sampler()
    negatives = {t.neg_task for _ in range(30) for t in sampler.batch(8) if t.task == "generate|sql"}
    assert negatives and "generate|sql" not in negatives
    assert len(negatives) > 1  # drawn from all other tasks


def test_batch_takes_each_task_once_when_possible() -> None:
    sampler = _sampler()
    for _ in range(12):  # two epochs of 48 anchors, deferral included
        tasks = [t.task for t in sampler.batch(8)]
        assert len(set(tasks)) == 8
    assert len(_sampler().batch(20)) == 20  # more anchors than tasks: repeats allowed


def test_epoch_visits_every_anchor() -> None:
    sampler = _sampler()
    anchors = [t.anchor for _ in range(6) for t in sampler.batch(8)]
    assert sampler.n_anchors == 48 and len(set(anchors)) == 48


def test_sampler_is_deterministic_per_seed() -> None:
    first, second = _sampler(1), _sampler(1)
    assert [first.batch(8) for _ in range(3)] == [second.batch(8) for _ in range(3)]
    assert _sampler(1).batch(8) != _sampler(2).batch(8)


def test_sampler_needs_positives() -> None:
    with pytest.raises(ValueError, match="two instructions"):
        TripletSampler({"a": ["x"], "b": ["y"]})


# -------------------------------------------------------------------------------------------- loss


def test_info_nce_masks_same_task_columns() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Keys: positive of query 0, positive of query 1, a negative of task A (query 0's task), one of task C.
    keys = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [0.8, 0.6]])
    tasks, key_tasks, temperature = ["A", "B"], ["A", "B", "A", "C"], 0.5
    logits = queries @ keys.T / temperature
    # Query 0 loses column 2 (same task, not its positive); query 1 keeps all (no other key of task B).
    expected_0 = -(logits[0, 0] - torch.logsumexp(logits[0, [0, 1, 3]], 0))
    expected_1 = -(logits[1, 1] - torch.logsumexp(logits[1], 0))
    masked = info_nce(queries, keys, tasks, key_tasks, temperature, mask_same_task=True)
    assert masked.item() == pytest.approx(((expected_0 + expected_1) / 2).item(), rel=1e-6)
    unmasked = info_nce(queries, keys, tasks, key_tasks, temperature, mask_same_task=False)
    plain = torch.nn.functional.cross_entropy(logits, torch.arange(2))
    assert unmasked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert masked.item() < unmasked.item()


def test_info_nce_masks_related_tasks_but_never_the_target() -> None:
    from icl_retriever.training.loss import _shares_noun

    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [0.8, 0.6]])
    tasks = ["write|poem", "compose|poem"]  # each other's positive column is related, yet stays the target
    key_tasks = ["write|poem", "compose|poem", "generate|poem", "write|story"]
    related = _shares_noun({t: parse_facets(t) for t in key_tasks})
    logits = queries @ keys.T / 0.5
    # Both queries lose the other poem task's columns (1 or 0, and 2); the story column stays a negative.
    expected_0 = -(logits[0, 0] - torch.logsumexp(logits[0, [0, 3]], 0))
    expected_1 = -(logits[1, 1] - torch.logsumexp(logits[1, [1, 3]], 0))
    loss = info_nce(queries, keys, tasks, key_tasks, 0.5, mask_same_task=True, related=related)
    assert loss.item() == pytest.approx(((expected_0 + expected_1) / 2).item(), rel=1e-6)
    by_label = info_nce(queries, keys, tasks, key_tasks, 0.5, related=_shares_noun())  # nouns read off the labels
    assert by_label.item() == pytest.approx(loss.item(), rel=1e-6)


def test_info_nce_gradient_is_finite_with_masking() -> None:
    queries = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    keys = torch.nn.functional.normalize(torch.randn(8, 8), dim=-1)
    loss = info_nce(queries, keys, ["a", "a", "b", "c"], ["a", "a", "b", "c", "a", "b", "d", "d"], 0.05)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(queries.grad).all()


class _StubEncoder:
    """Deterministic unit vectors per prompt, so the loss wiring is testable without a model."""

    def embed(self, prompts: list[str]) -> torch.Tensor:
        rows = [torch.randn(8, generator=torch.Generator().manual_seed(zlib.crc32(p.encode()))) for p in prompts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def test_triplet_loss_variants(tmp_path: Path) -> None:
    triplets = _sampler().batch(4)
    prompts = {t: t for trip in triplets for t in (trip.anchor, trip.positive, trip.negative)}
    stub = _StubEncoder()
    emb = {t: v for t, v in zip(prompts, stub.embed(list(prompts)), strict=True)}
    anchors = torch.stack([emb[t.anchor] for t in triplets])
    positives = torch.stack([emb[t.positive] for t in triplets])
    negatives = torch.stack([emb[t.negative] for t in triplets])
    tasks, neg_tasks = [t.task for t in triplets], [t.neg_task for t in triplets]

    def loss(**overrides: object) -> float:
        config = TrainConfig(train_file=TINY_IEB, output_dir=tmp_path, temperature=0.1, **overrides)
        return triplet_loss(stub, triplets, config, prompts).item()  # type: ignore[arg-type]

    with_negatives = info_nce(anchors, torch.cat([positives, negatives]), tasks, tasks + neg_tasks, 0.1)
    assert loss() == pytest.approx(with_negatives.item(), rel=1e-5)
    in_batch = info_nce(anchors, positives, tasks, tasks, 0.1)
    assert loss(hard_negatives=False) == pytest.approx(in_batch.item(), rel=1e-5)
    backward = info_nce(positives, anchors, tasks, tasks, 0.1)
    assert loss(symmetric=True) == pytest.approx((with_negatives + backward).item() / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------- config


def test_config_rejects_unknown_fields_and_double_budgets(tmp_path: Path) -> None:
    base = {"train_file": TINY_IEB, "output_dir": tmp_path}
    assert TrainConfig(**base).steps == 500
    with pytest.raises(ValidationError):
        TrainConfig(**base, step=3)
    with pytest.raises(ValidationError, match="steps or epochs"):
        TrainConfig(**base, steps=3, epochs=1)


# ------------------------------------------------------------------------------------------ train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three steps of 4 triplets from the default model, validating every 2 steps."""
    config = TrainConfig(
        train_file=TINY_IEB,
        output_dir=tmp_path_factory.mktemp("run") / "model",
        steps=3,
        batch_size=4,
        lr=1e-4,
        eval_every=2,
    )
    return train(config, show_progress_bar=False)


def test_train_output_loads_and_is_described(trained: Path) -> None:
    files = {p.name for p in trained.iterdir()}
    assert {"model.safetensors", "pie_config.json", "training_card.json", "delta.safetensors", "config.json"} <= files
    assert not {p for p in files if p.endswith((".bin", ".pt", ".pth", ".pkl"))}  # no pickle
    card = TrainingCard.model_validate_json((trained / "training_card.json").read_text(encoding="utf-8"))
    assert card.steps_done == 3 and card.config["batch_size"] == 4
    assert (card.train_tasks, card.val_tasks, card.train_instructions, card.val_instructions) == (6, 2, 36, 12)
    assert card.base_weights_sha256 and len(card.train_files_sha256[0]) == 64
    assert card.validation is not None and card.best_step in (2, 3)
    assert [h["step"] for h in card.validation_history] == [2, 3]
    assert math.isfinite(card.final_train_loss) and card.wall_time_s > 0
    encoder = PIEEncoder(trained)
    assert encoder.config.template == 'This sentence of "{instruction}" means:'
    assert encoder.config.max_length == 128
    # the floor of min_score="auto", measured on the 2 held-out tasks (12 instructions) as users load the model
    floor = calibration.load(trained)
    assert floor is not None and floor.files == ["tiny_ieb.json"] and floor.n_queries == 12
    assert encoder.calibrated_floor() == floor.min_score and floor.precision >= 0.9


def test_train_changes_the_embedding(trained: Path, encoder: PIEEncoder) -> None:
    before = encoder.encode(PROBE, show_progress_bar=False)
    after = PIEEncoder(trained).encode(PROBE, show_progress_bar=False)
    assert np.abs(after - before).max() > 1e-4


def test_delta_reproduces_the_trained_model(trained: Path) -> None:
    from transformers import AutoModel

    model = PIEEncoder(trained)
    expected = model.encode(PROBE, show_progress_bar=False)
    base = AutoModel.from_pretrained(base_model_dir())
    apply_delta(base, trained / "delta.safetensors")
    model.model.load_state_dict(base.state_dict())
    assert np.abs(model.encode(PROBE, show_progress_bar=False) - expected).max() <= 1e-3
    # Frozen embedding matrices are not in the delta.
    assert not any("word_embeddings" in name for name in load_file(trained / "delta.safetensors"))


def test_train_is_reproducible(tmp_path: Path) -> None:
    def run(name: str) -> Path:
        config = TrainConfig(
            train_file=TINY_JSONL,
            output_dir=tmp_path / name,
            steps=2,
            batch_size=4,
            val_fraction=0,
            base_model="default",
        )
        return train(config, show_progress_bar=False)

    first, second = load_file(run("a") / "model.safetensors"), load_file(run("b") / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    card = json.loads((tmp_path / "a" / "training_card.json").read_text(encoding="utf-8"))
    assert card["validation"] is None and card["val_tasks"] == 0


# ------------------------------------------------------------------------------ mixtures and groups


def test_groups_and_inputs_are_read() -> None:
    tasks = load_task_set(TINY_SNI)
    assert tasks.groups["Translation"]["Translate the given English sentence into French."] == "europarl"
    with_input = load_task_set(TINY_SNI, with_input=True)
    assert len(with_input.instructions["Title Generation"]) == 2  # the definition, and definition + input
    assert with_input.instructions["Title Generation"][1].endswith("discover a new species of frog in the Andes...")


def test_lead_views_add_the_first_sentences_of_longer_instructions_in_their_group() -> None:
    from icl_retriever.training.tasks import lead_sentences, with_lead_views

    assert lead_sentences("You are given a review.  Classify it as good or bad. Answer 'good' or 'bad'.", 2) == (
        "You are given a review. Classify it as good or bad."
    )
    assert lead_sentences("Write a poem. Keep it short.", 2) is None  # no longer than its lead: no new text
    assert lead_sentences("Compute 3.5 x 2. Show the steps. Then check it.", 1) == "Compute 3.5 x 2."
    tasks = load_task_set(TINY_SNI)
    viewed = with_lead_views(tasks, 1)
    assert with_lead_views(tasks, 0) is tasks
    added = 0
    for task, texts in viewed.instructions.items():
        original = tasks.instructions[task]
        assert texts[: len(original)] == original  # the originals first, in order
        for text in texts[len(original):]:
            source = next(o for o in original if " ".join(o.split()).startswith(text))
            assert viewed.groups[task][text] == tasks.groups[task][source]
            added += 1
    assert added > 0 and viewed.facets == tasks.facets


def test_positives_come_from_another_group_when_there_is_one() -> None:
    tasks = load_task_set(TINY_SNI, with_input=True)
    sampler = TripletSampler(tasks.instructions, tasks.facets, seed=0, groups=tasks.groups)
    seen = 0
    for _ in range(20):
        for t in sampler.batch(4):
            groups = tasks.groups[t.task]
            if len(set(groups.values())) > 1:
                assert groups[t.anchor] != groups[t.positive], t
                seen += 1
            else:  # one dataset only: another text of the task
                assert t.positive != t.anchor and t.positive in tasks.instructions[t.task]
    assert seen > 0


def test_group_negatives_come_from_the_anchors_group_under_another_task() -> None:
    tasks = load_task_set(TINY_SNI, with_input=True)
    sampler = TripletSampler(tasks.instructions, tasks.facets, seed=0, groups=tasks.groups, group_negatives=True)
    grouped = plain = 0
    for _ in range(30):
        for t in sampler.batch(4):
            anchor_group = tasks.groups[t.task][t.anchor]
            assert t.neg_task != t.task and t.negative in tasks.instructions[t.neg_task]
            if anchor_group == "news":  # news holds Summarization and Title Generation
                assert tasks.groups[t.neg_task][t.negative] == "news", t
                grouped += 1
            else:  # no other task in the group: a negative of any other task
                plain += 1
    assert grouped > 0 and plain > 0
    off = TripletSampler(tasks.instructions, tasks.facets, seed=0, groups=tasks.groups)
    news = [t for _ in range(30) for t in off.batch(4) if tasks.groups[t.task][t.anchor] == "news"]
    assert any(tasks.groups[t.neg_task].get(t.negative) != "news" for t in news)  # off: not only the group's


def test_label_field_reads_a_demo_pool(tmp_path: Path) -> None:
    tasks = load_task_set(DEFAULT_POOL, label_field="task")
    assert len(tasks.instructions) == 77
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"instruction": "a", "metadata": {"task": "x"}}\n{"instruction": "b"}\n', encoding="utf-8")
    with pytest.raises(PoolError, match="no metadata field 'task'"):
        load_task_set(pool, label_field="task")


def test_config_takes_one_file_or_several(tmp_path: Path) -> None:
    one = TrainConfig(train_file=TINY_IEB, output_dir=tmp_path)
    assert one.train_files == [TINY_IEB]
    with pytest.raises(ValidationError, match="one positive share per train file"):
        TrainConfig(train_files=[TINY_IEB, TINY_SNI], mix=[1.0], output_dir=tmp_path)
    with pytest.raises(ValidationError, match="not both"):
        TrainConfig(train_file=TINY_IEB, train_files=[TINY_IEB], output_dir=tmp_path)


def test_split_seed_fixes_the_held_out_tasks_across_training_seeds(tmp_path: Path) -> None:
    from icl_retriever.training.validation import _sources

    def held_out(**seeds: int) -> list[str]:
        config = TrainConfig(train_file=TINY_IEB, output_dir=tmp_path, val_fraction=0.4, **seeds)
        (source,) = _sources(config)
        assert source.val is not None
        return sorted(source.val.instructions)

    assert held_out(seed=1, split_seed=0) == held_out(seed=0)
    assert TrainConfig(train_file=TINY_IEB, output_dir=tmp_path, seed=3).held_out_seed == 3
    assert any(held_out(seed=s) != held_out(seed=0) for s in range(1, 6))  # the default follows the seed


def test_batch_shares() -> None:
    from icl_retriever.training.validation import _shares

    assert _shares(32, [1, 1]) == [16, 16]
    assert _shares(32, [2, 1]) == [21, 11]
    assert _shares(4, [100, 1]) == [3, 1]  # every source keeps an anchor
    assert sum(_shares(7, [1, 1, 1])) == 7


def test_mixture_with_distillation_trains_and_records_each_source(tmp_path: Path) -> None:
    """Two sources in every batch, a validation file, distillation, weight averaging, early stopping: one tiny
    real run."""
    config = TrainConfig(
        train_files=[TINY_IEB, TINY_SNI], mix=[1, 1], with_input=True, val_files=[TINY_SNI],
        output_dir=tmp_path / "mix", steps=4, batch_size=4, lr=1e-4, eval_every=1, patience=1,
        distill=1.0, base_model="default-base", val_fraction=0.25, ema=0.9, lead_sentences=1, mask_shared_noun=True,
    )
    out = train(config, show_progress_bar=False)
    card = TrainingCard.model_validate_json((out / "training_card.json").read_text(encoding="utf-8"))
    assert card.anchors_per_batch == {"tiny_ieb": 2, "tiny_sni": 2}
    assert card.val_files == [str(TINY_SNI.resolve())]
    assert card.validation is not None
    assert {"tiny_ieb.p_at_1", "tiny_sni.cross_group_p_at_1", "score"} <= set(card.validation)
    assert 1 <= card.steps_done <= 4 and len(card.validation_history) == card.steps_done
    # the saved model, validated again on the same split (what scripts/validate.py prints), gives the card's figures
    again = validate(PIEEncoder(out), config)  # as users load it (ONNX Runtime on CPU)
    assert again["score"] == pytest.approx(card.validation["score"], abs=1e-9)
    assert again["tiny_sni.cross_group_p_at_1"] == pytest.approx(card.validation["tiny_sni.cross_group_p_at_1"])
    hits = validation_hits(PIEEncoder(out), config)  # the same queries, one by one (scripts/validate.py --against)
    assert sorted(hits) == ["tiny_ieb", "tiny_sni"]
    assert hits["tiny_ieb"].mean() == pytest.approx(again["tiny_ieb.p_at_1"])
    assert hits["tiny_sni"].mean() == pytest.approx(again["tiny_sni.cross_group_p_at_1"])
    if card.steps_done < 4:  # stopped early: the last `patience` checks were no better than the best
        best = max(h["score"] for h in card.validation_history)
        assert all(h["score"] <= best for h in card.validation_history[-1:])


def test_distillation_keeps_the_start(tmp_path: Path) -> None:
    """The same steps with a strong distillation weight move the embedding less."""

    def moved(distill: float) -> float:
        config = TrainConfig(
            train_file=TINY_IEB, output_dir=tmp_path / f"d{distill}", steps=3, batch_size=4, lr=3e-4,
            val_fraction=0, distill=distill, base_model="default-base",
        )
        start = PIEEncoder("default-base", template="short", max_length=128).encode(PROBE, show_progress_bar=False)
        after = PIEEncoder(train(config, show_progress_bar=False)).encode(PROBE, show_progress_bar=False)
        return float(1 - (start * after).sum(axis=1).mean())

    assert moved(50.0) < moved(0.0)


def test_frozen_layers_stay_as_they_started(tmp_path: Path) -> None:
    """--freeze-layers N: the first N transformer layers are not trained, the others are; too many is an error."""
    config = TrainConfig(
        train_file=TINY_IEB, output_dir=tmp_path / "f", steps=2, batch_size=4, lr=3e-4, val_fraction=0,
        base_model="default-base", freeze_layers=4,
    )
    delta = load_file(train(config, show_progress_bar=False) / "delta.safetensors")
    changed = {int(name.split("layer.")[1].split(".")[0]) for name, d in delta.items()
               if "layer." in name and d.abs().max() > 0}
    assert changed and min(changed) == 4, sorted(changed)
    with pytest.raises(ValueError, match="freeze_layers=7, but the model has 6 layers"):
        train(config.model_copy(update={"freeze_layers": 7, "output_dir": tmp_path / "g"}), show_progress_bar=False)


def test_lora_trains_a_low_rank_change_merged_into_plain_weights(tmp_path: Path) -> None:
    """--lora-rank R: every linear weight moves by a matrix of rank <= R, biases and norms not at all, and the
    saved model holds plain weights (no adapter keys) that load without peft."""
    config = TrainConfig(
        train_file=TINY_IEB, output_dir=tmp_path / "l", steps=2, batch_size=4, lr=1e-2, val_fraction=0,
        base_model="default-base", lora_rank=2,
    )
    out = train(config, show_progress_bar=False)
    assert not [k for k in load_file(out / "model.safetensors") if "lora" in k]
    delta = {name: d.float() for name, d in load_file(out / "delta.safetensors").items()}
    moved = {name: d for name, d in delta.items() if d.abs().max() > 0}
    assert moved and all(name.endswith("weight") and d.ndim == 2 for name, d in moved.items()), sorted(moved)
    assert any(".query." in name for name in moved) and any(".intermediate." in name for name in moved)
    for name, d in moved.items():
        s = torch.linalg.svdvals(d)
        assert s[2] < 1e-2 * s[0], (name, s[:4])  # rank 2, up to the float16 rounding of the shipped delta
    with pytest.raises(ValidationError, match="give one"):
        TrainConfig(train_file=TINY_IEB, output_dir=tmp_path / "x", lora_rank=2, freeze_layers=2)


def test_lora_without_peft_says_which_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed: importing it raises ImportError
    config = TrainConfig(train_file=TINY_IEB, output_dir=tmp_path / "l", steps=1, batch_size=4, val_fraction=0,
                         base_model="default-base", lora_rank=2)
    with pytest.raises(ValueError, match=r"icl-retriever\[lora\]"):
        train(config, show_progress_bar=False)
    assert not (tmp_path / "l").exists()  # nothing half-written


# ------------------------------------------------------------------------------------- shared data


@needs_ieb
def test_load_tasks_on_the_ieb_train_file() -> None:
    tasks = load_tasks(IEB / "eft_train_silver.json")
    assert len(tasks) == 685
    assert sum(len(v) for v in tasks.values()) == 16_460


def test_weight_average_is_what_is_validated_and_saved(tmp_path: Path) -> None:
    """--ema: the saved model is the moving average of the weights, not the last step (nor the start)."""
    common = dict(train_file=TINY_IEB, steps=3, batch_size=4, lr=3e-4, val_fraction=0, base_model="default-base")
    last = load_file(train(TrainConfig(**common, output_dir=tmp_path / "last"), show_progress_bar=False)
                     / "delta.safetensors")
    averaged = load_file(train(TrainConfig(**common, output_dir=tmp_path / "ema", ema=0.5), show_progress_bar=False)
                         / "delta.safetensors")
    name = next(n for n, d in last.items() if d.abs().max() > 0)
    moved, moved_avg = last[name].float().abs().max(), averaged[name].float().abs().max()
    assert 0 < moved_avg < moved  # the average lags the trained weights but has left the start
    with pytest.raises(ValidationError):
        TrainConfig(**common, output_dir=tmp_path / "x", ema=1.0)
