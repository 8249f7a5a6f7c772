"""DSPy integration, offline: PIE as a dspy.Embedder for KNN, and PIEFewShot over a real index.

No LM is called: DSPy's DummyLM answers, and its history shows the demos the program was given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

dspy = pytest.importorskip("dspy")  # the [dspy] extra; CI installs it

from dspy.predict.knn import KNN  # noqa: E402
from dspy.utils.dummies import DummyLM  # noqa: E402

from icl_retriever import PIEEncoder, Retriever  # noqa: E402
from icl_retriever.integrations.dspy import PIEFewShot, demo_to_example, pie_embedder  # noqa: E402

FIELDS = {"question": "instruction", "context": "input", "answer": "output"}


def _user_turns(lm: DummyLM) -> list[str]:
    return [m["content"] for m in lm.history[-1]["messages"] if m["role"] == "user"]


def test_pie_embedder_drives_dspy_knn(encoder: PIEEncoder) -> None:
    trainset = [
        dspy.Example(question=q, answer=a).with_inputs("question")
        for q, a in [
            ("Write a poem about the sea.", "Waves..."),
            ("Tell me three facts about the sea.", "Salty..."),
            ("Translate 'thank you' into German.", "Danke"),
            ("Compose a short poem about autumn leaves.", "Leaves..."),
        ]
    ]
    embedder = pie_embedder(encoder)
    vectors = embedder(["Write a poem about the sea."])
    assert vectors.shape == (1, encoder.dim) and abs(float((vectors**2).sum()) - 1.0) < 1e-4  # unit length
    knn = KNN(k=2, trainset=trainset, vectorizer=embedder)
    poems = knn(question="Write a poem about the mountains.")
    assert {e.answer for e in poems} == {"Waves...", "Leaves..."}  # the task, not the topic "sea"
    assert dspy.KNNFewShot(k=1, trainset=trainset, vectorizer=embedder).compile(dspy.Predict("question -> answer"))
    # the DSPy page's plain swap (docs/integrations/dspy.md) works too: dspy.Embedder over PIEEncoder.encode
    plain = KNN(k=2, trainset=trainset, vectorizer=dspy.Embedder(encoder.encode))
    assert {e.answer for e in plain(question="Write a poem about the mountains.")} == {"Waves...", "Leaves..."}


def test_pie_few_shot_gives_each_call_its_task_demos(default_index: Path, encoder: PIEEncoder) -> None:
    fewshot = PIEFewShot.from_index(default_index, k=2, encoder=encoder, fields=FIELDS)
    student = dspy.Predict("question, context -> answer")
    program = fewshot.compile(student)
    lm = DummyLM([{"answer": "Gute Nacht"}, {"answer": "SELECT 1;"}])
    with dspy.context(lm=lm):
        assert program(question="Translate 'good night' into German.", context="").answer == "Gute Nacht"
        german = _user_turns(lm)
        program(question="Write a SQL query that lists customers from Spain.", context="")
        sql = _user_turns(lm)
    # two demos, then the request: the demos are of the request's task, and differ per call
    assert len(german) == 3 and "German" in german[0] and "Translat" in german[1]
    assert len(sql) == 3 and all("SQL" in turn or "Table:" in turn for turn in sql[:2])
    assert student.demos == []  # the program passed in is left as it was

    examples = fewshot.examples(question="Translate 'good night' into German.", context="")
    assert [set(e.inputs().keys()) for e in examples] == [{"question", "context"}] * 2
    assert all(e.labels().answer for e in examples)


def test_controls_and_fields_are_checked(default_retriever: Retriever) -> None:
    with pytest.raises(ValueError, match="diversity must be"):
        PIEFewShot(default_retriever, k=2, diversity=3)
    with pytest.raises(ValueError, match="extra|not permitted|filterz"):
        PIEFewShot(default_retriever, k=2, filterz={"task": "x"})
    only_french = PIEFewShot(default_retriever, k=3, filter={"task": "translation_en_fr"})
    examples = only_french.examples(question="Translate 'good night' into German.")
    assert len(examples) == 3 and {e.task for e in examples} == {"translation_en_fr"}
    assert set(examples[0].inputs().keys()) == {"instruction", "input"}
    with pytest.raises(KeyError, match="input_keys"):
        PIEFewShot(default_retriever, k=1, input_keys=["question"]).examples(prompt="hi")
    with pytest.raises(ValueError, match="no request text"):
        only_french.examples(question="  ")
    with pytest.raises(KeyError, match="has no 'difficulty'"):
        demo_to_example(default_retriever.demos[0], {"question": "instruction", "level": "difficulty"})
