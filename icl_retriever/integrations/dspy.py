"""DSPy: PIE vectors for ``KNNFewShot``, and demos from an index as ``dspy.Example``s for a program.

Two ways in, both offline until the program itself calls its LM:

- ``KNNFewShot(k=3, trainset=trainset, vectorizer=pie_embedder())``: DSPy's own in-memory KNN over
  your trainset, embedded by PIE. DSPy takes dot products without normalising; PIE vectors are unit
  length, so its scores are cosines.
- :class:`PIEFewShot` (a DSPy teleprompter): ``PIEFewShot(retriever, k=3).compile(program)`` returns a
  program that, on every call, retrieves the demos of the request's task from an index (with the
  same search controls as ``Retriever.get_demos``) and gives them to each predictor as labelled demos.
  :meth:`PIEFewShot.examples` returns those ``dspy.Example``s for use elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dspy
import numpy as np
from dspy.teleprompt import Teleprompter

from icl_retriever.search.controls import SearchControls
from icl_retriever.encoder import PIEEncoder
from icl_retriever.records import Demo, demo_fields, join_fields
from icl_retriever.retriever import Retriever

__all__ = ["PIEFewShot", "demo_to_example", "pie_embedder"]


def pie_embedder(encoder: PIEEncoder | None = None, *, batch_size: int | None = None) -> dspy.Embedder:
    """A ``dspy.Embedder`` over PIE, for DSPy's ``KNNFewShot`` / ``KNN``.

    Args:
        encoder: the encoder to embed with (default: the embedded default model).
        batch_size: texts per forward pass (default: the runtime's).

    Returns:
        An embedder returning unit vectors, so DSPy's dot products are cosines.

    Examples:
        >>> knn = dspy.KNNFewShot(k=3, trainset=trainset, vectorizer=pie_embedder())
    """
    enc = encoder or PIEEncoder()

    def embed(texts: list[str]) -> np.ndarray:
        return enc.encode(list(texts), batch_size=batch_size, show_progress_bar=False)

    return dspy.Embedder(embed, batch_size=max(batch_size or enc.default_batch_size, 1))


def demo_to_example(demo: Demo, fields: Mapping[str, str] | None = None) -> dspy.Example:
    """A ``dspy.Example`` of a demo.

    Without ``fields``: ``instruction``, ``input``, ``output`` and the metadata (inputs: instruction
    and input). With ``fields`` (program field -> ``instruction`` / ``input`` / ``output`` / a metadata
    key), the example carries the program's field names; fields drawn from ``output`` are its labels,
    the others its inputs.

    Args:
        demo: the demo to convert.
        fields: program field -> ``instruction`` / ``input`` / ``output`` / a metadata key.

    Returns:
        The example, its inputs marked with ``with_inputs``.

    Raises:
        KeyError: a field names something the demo does not have.
    """
    if fields is None:
        return dspy.Example(**demo_fields(demo)).with_inputs("instruction", "input")
    values: dict[str, Any] = {}
    for name, source in fields.items():
        if source in ("instruction", "input", "output"):
            values[name] = getattr(demo, source)
        elif source in demo.metadata:
            values[name] = demo.metadata[source]
        else:
            raise KeyError(f"field {name!r}: demo {demo.id!r} has no {source!r} (instruction, input, output or metadata)")
    return dspy.Example(**values).with_inputs(*(name for name, source in fields.items() if source != "output"))


class PIEFewShot(Teleprompter):
    """Demos of the request's task from a PIE index, attached to a DSPy program at every call.

    Args:
        retriever: a :class:`Retriever` (see :meth:`from_index`).
        k: demos per call.
        input_keys: the program inputs that state the request, joined into the query (default: all
            inputs of the call, in order).
        fields: program field -> demo attribute / metadata key, as in :func:`demo_to_example`.
        **controls: search controls of ``Retriever.get_demos`` (``filter``, ``diversity``, ``rerank``,
            ...), validated here: an unknown or invalid one is a ``ValueError`` now, not at the first call.

    Raises:
        ValueError: an unknown or invalid search control, or ``k < 1``.

    Examples:
        >>> fewshot = PIEFewShot.from_index("indexes/default", k=3,
        ...                                 fields={"question": "instruction", "answer": "output"})
        >>> program = fewshot.compile(dspy.Predict("question -> answer"))
        >>> program(question="Give me a slogan for a coffee shop.")  # calls the configured LM
    """

    def __init__(
        self,
        retriever: Retriever,
        k: int = 4,
        *,
        input_keys: Sequence[str] | None = None,
        fields: Mapping[str, str] | None = None,
        **controls: Any,
    ) -> None:
        SearchControls.parse(k=k, **controls)
        self.retriever = retriever
        self.k = k
        self.input_keys = list(input_keys) if input_keys is not None else None
        self.fields = dict(fields) if fields is not None else None
        self.controls = controls

    @classmethod
    def from_index(
        cls,
        path: str | Path,
        k: int = 4,
        *,
        encoder: PIEEncoder | None = None,
        model: str | Path | None = None,
        verify: bool = True,
        **kwargs: Any,
    ) -> PIEFewShot:
        """Open an index directory (as :meth:`Retriever.from_index`) and wrap it.

        Args:
            path: the index directory.
            k: demos per call.
            encoder: an already loaded encoder to share (it must be the index's).
            model: the model to load when the manifest names one outside the index directory (one you trust).
            verify: check the index files' sha256.
            **kwargs: ``input_keys``, ``fields`` and the search controls, as for the constructor.

        Returns:
            The teleprompter over the opened index.

        Raises:
            IndexFormatError: the index directory fails its checks.
            ValueError: an unknown or invalid search control.
        """
        return cls(Retriever.from_index(path, encoder=encoder, model=model, verify=verify), k, **kwargs)

    def query(self, **inputs: Any) -> str:
        """The request text of a call's inputs: the ``input_keys`` fields (default: all), joined by blank lines.

        Args:
            **inputs: the keyword inputs of a program call.

        Returns:
            The text demos are retrieved for.

        Raises:
            ValueError: the chosen inputs hold no text.
        """
        keys = self.input_keys if self.input_keys is not None else list(inputs)
        text = join_fields(inputs, keys, among="program's inputs")
        if not text:
            raise ValueError(f"the inputs {sorted(inputs)} hold no request text to retrieve demos for")
        return text

    def examples(self, **inputs: Any) -> list[dspy.Example]:
        """The ``k`` demos for a call's inputs, best first, as ``dspy.Example``s.

        Args:
            **inputs: the keyword inputs of a program call.

        Returns:
            The examples :meth:`compile`'s program attaches for these inputs.
        """
        demos = self.retriever.get_demos(self.query(**inputs), k=self.k, **self.controls)
        return [demo_to_example(d, self.fields) for d in demos]

    def compile(self, student: dspy.Module, *, trainset: Any = None, teacher: Any = None, **_: Any) -> dspy.Module:
        """A copy of ``student`` whose every call runs a fresh copy with the retrieved demos.

        ``trainset`` and ``teacher`` are not used: the index is the training set, and its demos are
        attached as they are (no bootstrapping, no LM call here).

        Args:
            student: the program to give demos to.
            trainset: ignored (DSPy's teleprompter signature).
            teacher: ignored (DSPy's teleprompter signature).

        Returns:
            A program that retrieves demos for each call's inputs and sets them on every predictor of a
            fresh copy of ``student`` (concurrent calls never share demos).
        """
        compiled = student.reset_copy()

        def forward(_self: dspy.Module, **inputs: Any) -> Any:
            program = student.reset_copy()  # per call: concurrent calls never share demos
            demos = self.examples(**inputs)
            for predictor in program.predictors():
                predictor.demos = list(demos)
            return program(**inputs)

        compiled.forward = forward.__get__(compiled)  # type: ignore[method-assign]
        return compiled


