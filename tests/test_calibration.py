"""The calibrated floor of min_score="auto": how it is measured, stored, checked and applied."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from icl_retriever import PIEEncoder, Retriever, default_model
from icl_retriever.calibration import (
    CALIBRATION_FILE,
    FloorOutcomes,
    calibrate,
    choose_floor,
    floor_outcomes,
    load,
    save,
)
from icl_retriever.errors import ModelLoadError


def test_choose_floor_is_the_lowest_cosine_that_keeps_the_precision() -> None:
    scores = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6])
    correct = np.array([True, True, True, False, True, False, False])
    outcomes = FloorOutcomes(scores=scores, correct=correct, absent=np.zeros(7, dtype=bool))
    assert choose_floor(outcomes, 0.8) == (0.75, 0.8)  # 4 of the 5 at or above 0.75
    assert choose_floor(outcomes, 1.0) == (0.85, 1.0)
    # a floor never splits equal cosines: with the wrong demo tied at 0.85, 0.85 is 3 of 4
    tied = FloorOutcomes(scores=np.array([0.9, 0.85, 0.85]), correct=np.array([True, True, False]), absent=np.zeros(3, bool))
    assert choose_floor(tied, 0.9) == (0.9, 1.0)
    with pytest.raises(ValueError, match="no cosine floor reaches precision 0.9"):
        choose_floor(FloorOutcomes(scores=scores, correct=np.zeros(7, bool), absent=np.zeros(7, bool)), 0.9)


def test_floor_outcomes_hide_the_task_or_only_the_query() -> None:
    # two tasks, two texts each; a duplicate of text 0 under task b must not count as its neighbour
    vectors = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 3]]
    vectors[1] = vectors[0]  # text 1 is the same vector as text 0 (same task a)
    labels = ["a", "a", "b", "b", "b"]
    texts = ["x", "y", "x ", "z", "w"]
    present = floor_outcomes(vectors, labels, texts, absent_share=0.0)
    assert present.correct[0] and present.scores[0] == pytest.approx(1.0)  # finds text 1, not its own twin
    absent = floor_outcomes(vectors, labels, texts, absent_share=1.0)
    assert absent.absent.all() and not absent.correct.any()
    rates = absent.rates(0.5)
    assert rates["empty_when_absent"] == 1.0  # every top-1 has cosine 0 once the task is gone
    half = floor_outcomes(vectors, labels, texts, absent_share=0.4, seed=1)
    assert half.absent.sum() == 2
    with pytest.raises(ValueError, match="two different tasks"):
        floor_outcomes(vectors[:2], ["a", "a"], ["x", "y"])


def test_calibration_file_round_trip_and_bad_file(tmp_path: Path, encoder: PIEEncoder) -> None:
    sets = [("tiny", ["Write a poem about the sea.", "Compose a poem about snow.", "Translate 'hi' into German.",
                      "Say 'thanks' in German.", "Summarize this article.", "Give a short summary of the text."],
             ["poem", "poem", "de", "de", "sum", "sum"])]
    found = calibrate(encoder, sets, precision=0.5)
    assert found.fingerprint == encoder.fingerprint and found.n_queries == 6 and found.files == ["tiny"]
    assert found.precision >= 0.5
    save(found, tmp_path)
    assert load(tmp_path) == found
    assert load(tmp_path / "nowhere") is None
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"min_score": 3}), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not a valid floor calibration"):
        load(tmp_path)


def test_the_shipped_default_carries_its_floor(encoder: PIEEncoder) -> None:
    shipped = load(default_model.HERE)
    assert shipped is not None and shipped.target_precision == 0.9 and shipped.precision >= 0.9
    assert shipped.files == ["eft_train_silver.json", "sni_train.json"]  # held-out train tasks, never a test set
    assert encoder.calibrated_floor() == shipped.min_score
    with pytest.raises(ValueError, match="measured with other weights or settings"):
        PIEEncoder(max_length=64).calibrated_floor()
    with pytest.raises(ValueError, match="carries no calibrated floor"):
        PIEEncoder("default-base").calibrated_floor()


def test_min_score_drops_demos_below_the_floor(default_retriever: Retriever) -> None:
    query = "Write a limerick about a cat who loves lasagna."
    plain = default_retriever.get_demos(query, k=4)
    floor = (plain[0].score + plain[-1].score) / 2
    kept = default_retriever.get_demos(query, k=4, min_score=floor)
    assert 1 <= len(kept) < 4 and all(d.score >= floor for d in kept)
    assert default_retriever.get_demos(query, k=4, min_score=1.0) == []
    auto = default_retriever.get_demos(query, k=4, min_score="auto")
    assert auto and all(d.score >= default_retriever.encoder.calibrated_floor() for d in auto)
    # a request whose task the pool lacks gets nothing rather than demos of another task
    assert default_retriever.get_demos("Compute the integral of x^2 from 0 to 3.", k=3, min_score="auto") == []
    batch = default_retriever.get_demos_batch([query, "Compute the integral of x^2 from 0 to 3."], k=3, min_score="auto")
    assert batch[0] and batch[1] == []
    for bad in (1.5, "high", True):
        with pytest.raises(ValueError, match="min_score must be a cosine"):
            default_retriever.get_demos(query, min_score=bad)


def test_min_score_in_langchain_and_dspy(default_retriever: Retriever) -> None:
    from icl_retriever.langchain import PIEExampleSelector, PIERetriever

    off_task = "Compute the integral of x^2 from 0 to 3."
    assert PIERetriever(retriever=default_retriever, k=3, search_kwargs={"min_score": "auto"}).invoke(off_task) == []
    selector = PIEExampleSelector(retriever=default_retriever, k=3, search_kwargs={"min_score": "auto"})
    assert selector.select_examples({"question": off_task}) == []
    assert selector.select_examples({"question": "Write a limerick about a dog who loves naps."})
    dspy_integration = pytest.importorskip("icl_retriever.integrations.dspy")
    assert dspy_integration.PIEFewShot(default_retriever, k=3, min_score="auto").examples(question=off_task) == []
