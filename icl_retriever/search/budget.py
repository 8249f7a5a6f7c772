"""The token budget (``max_tokens``): formatting demos as the prompt will show them, counting their
tokens with any tokenizer, and packing the best that fit."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from icl_retriever.encoder.config import char_budget
from icl_retriever.records import Demo

#: Default ``demo_format``: instruction, input (when not empty) and output, one per line.
DEFAULT_DEMO_FORMAT = "{instruction}\n{input}\n{output}"
DemoFormat = str | Callable[[Demo], str]


# max_tokens -------------------------------------------------------------------------------------


def format_demo(demo: Demo, demo_format: DemoFormat | None = None) -> str:
    """The text a demo takes in a prompt, as counted for ``max_tokens``.

    ``None`` is :data:`DEFAULT_DEMO_FORMAT` with the input line left out when the input is empty. A
    string is filled with ``str.format`` from ``id``, ``instruction``, ``input``, ``output`` and the
    metadata fields; a callable gets the :class:`Demo`.
    """
    if demo_format is None:
        return "\n".join(part for part in (demo.instruction, demo.input, demo.output) if part)
    if callable(demo_format):
        text = demo_format(demo)
        if not isinstance(text, str):
            raise TypeError(f"demo_format returned {type(text).__name__}, expected str")
        return text
    fields = {**demo.metadata, "id": demo.id, "instruction": demo.instruction, "input": demo.input, "output": demo.output}
    try:
        return demo_format.format_map(fields)
    except KeyError as exc:
        raise ValueError(f"demo_format names field {exc.args[0]!r}, which demo {demo.id!r} does not have") from None
    except (IndexError, AttributeError, ValueError, TypeError) as exc:  # a format spec that does not fit the value
        raise ValueError(f"demo_format {demo_format!r} on demo {demo.id!r}: {exc}") from None


def pack_by_tokens(lengths: Iterable[int], budget: int, k: int) -> list[int]:
    """Greedy packing in rank order: take each item that still fits, skip one that would overflow.

    Returns:
        Indices of the items taken (at most ``k``), in order; their lengths sum to at most ``budget``.
    """
    taken: list[int] = []
    used = 0
    for i, length in enumerate(lengths):
        if len(taken) >= k or used >= budget:
            break
        if used + length <= budget:
            taken.append(i)
            used += length
    return taken


TokenCounter = Callable[[list[str]], list[int]]


def count_within(counter: TokenCounter, texts: list[str], budget: int) -> list[int]:
    """Token counts of ``texts`` as far as a budget of ``budget`` tokens needs them, so that a demo of
    megabytes is not tokenised whole at every query.

    A text longer than :func:`~icl_retriever.encoder.config.char_budget` characters is first counted up to
    the last blank before that many: its tokens are the first of the whole text's, so if they are over the
    budget the text is too, and that count stands in (the demo does not fit either way). Only a text with
    fewer tokens than that in its head (thousands of characters without a blank, say) is counted whole.
    """
    limit = char_budget(budget)
    long_ids = [i for i, text in enumerate(texts) if len(text) > limit]
    if not long_ids:
        return counter(texts)
    heads = {i: texts[i][: max(0, *(texts[i].rfind(blank, 0, limit) for blank in (" ", "\n", "\t")))] for i in long_ids}
    short_ids = [i for i in range(len(texts)) if i not in heads]
    counts = dict(zip(short_ids, counter([texts[i] for i in short_ids]), strict=True))
    head_counts = dict(zip(heads, counter(list(heads.values())), strict=True))
    whole = [i for i in long_ids if head_counts[i] <= budget]
    counts.update({i: head_counts[i] for i in long_ids if head_counts[i] > budget})
    counts.update(zip(whole, counter([texts[i] for i in whole]), strict=True))
    return [counts[i] for i in range(len(texts))]


def token_counter(tokenizer: Any) -> TokenCounter:
    """A function counting tokens of texts, from a Hugging Face tokenizer, a tiktoken-like object with
    ``encode``, or a callable str -> int. Special tokens (CLS / SEP ...) are not counted."""
    if hasattr(tokenizer, "encode_batch"):  # the ``tokenizers`` library (the ONNX runtime's tokenizer)

        def count_fast(texts: list[str]) -> list[int]:
            return [len(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)] if texts else []

        return count_fast
    transformers = sys.modules.get("transformers")  # not imported: cannot be one of its tokenizers
    if transformers is not None and isinstance(tokenizer, transformers.PreTrainedTokenizerBase):

        def count_hf(texts: list[str]) -> list[int]:
            if not texts:
                return []
            ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
            return [len(row) for row in ids]

        return count_hf
    if hasattr(tokenizer, "encode") and callable(tokenizer.encode):
        return lambda texts: [len(tokenizer.encode(t)) for t in texts]
    if callable(tokenizer):

        def count_callable(texts: list[str]) -> list[int]:
            counts = [tokenizer(t) for t in texts]
            for c in counts:
                if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or c < 0:
                    raise TypeError(f"tokenizer callable must return a token count (int >= 0), got {c!r}")
            return [int(c) for c in counts]

        return count_callable
    raise ValueError(
        "tokenizer must be a Hugging Face tokenizer, a model name or directory, an object with encode(), "
        f"or a callable str -> int; got {type(tokenizer).__name__}"
    )


_TOKENIZERS: dict[str, Any] = {}


def resolve_tokenizer(tokenizer: Any, default: Any) -> TokenCounter:
    """The token counter for ``max_tokens``: ``None`` uses ``default`` (the encoder's tokenizer); a string
    or path is loaded with ``AutoTokenizer.from_pretrained`` (once per process)."""
    if tokenizer is None:
        tokenizer = default
    elif isinstance(tokenizer, (str, os.PathLike)):
        name = str(tokenizer)
        if name not in _TOKENIZERS:
            from transformers import AutoTokenizer

            try:
                _TOKENIZERS[name] = AutoTokenizer.from_pretrained(name)
            except Exception as exc:  # OSError, ValueError, hub errors
                raise ValueError(f"cannot load tokenizer {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        tokenizer = _TOKENIZERS[name]
    return token_counter(tokenizer)
