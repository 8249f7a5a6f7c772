"""What decides an embedding besides the weights: the prompt template, pooling, token budget, numerics
(:class:`EncoderConfig`, hashed into every encoder's fingerprint), and applying a template."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Pooling = Literal["mean", "cls", "last"]
#: How vectors are computed: PyTorch, ONNX Runtime (CPU, float32, torch-free at load), or ONNX where it
#: can be used and torch elsewhere (see :mod:`icl_retriever.encoder.onnx`).
Runtime = Literal["auto", "torch", "onnx"]

#: Named templates. ``{instruction}`` is replaced by the (stripped) instruction.
TEMPLATES: dict[str, str] = {
    # The PIE paper's prompt.
    "pie": (
        "The essence of an instruction is its task intention. With this in mind, given the instruction "
        "below:\n\n{instruction}\n\nafter thinking step by step, the task of the given instruction is:"
    ),
    # The PIE authors' short prompt; measured best for the untrained MiniLM base with mean pooling.
    "short": 'This sentence of "{instruction}" means:',
    "plain": "{instruction}",
}

#: File holding template / pooling / max length next to a model's weights.
PIE_CONFIG_FILE = "pie_config.json"


class EncoderConfig(BaseModel):
    """Everything that decides an embedding; it is hashed, with the weights, into the fingerprint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description='"default", a local model directory or a Hugging Face id')
    template: str = Field(description="prompt with an {instruction} placeholder")
    pooling: Pooling = Field("mean", description="token states to one vector: mean, cls or last (token)")
    max_length: int = Field(256, ge=8, description="token budget per prompt, template included")
    add_period: bool = Field(False, description='append "." to instructions not ending in . ? " or \'')
    normalize: bool = Field(True, description="L2-normalise every vector, so dot products are cosines")
    quantize: bool = Field(False, description="dynamic int8 quantisation of the Linear layers (CPU only)")
    quantize_scheme: Literal["torch", "onnx"] = Field(
        "torch",
        description="with quantize: torch's dynamic int8 of the Linear layers (feed-forward down-projections kept "
        "float), or ONNX Runtime's dynamic per-channel int8 of every MatMul; they give different vectors",
    )


def resolve_template(template: str) -> str:
    """Return the template text for a name in TEMPLATES or a literal template string."""
    text = TEMPLATES.get(template, template)
    if "{instruction}" not in text:
        raise ValueError(
            f"template {template!r} is neither one of {sorted(TEMPLATES)} nor a string containing '{{instruction}}'"
        )
    return text


def apply_template(instruction: str, template: str, add_period: bool) -> str:
    """Wrap one instruction in the template (PIE's period rule applied when asked)."""
    text = instruction.strip()
    if add_period and text and text[-1] not in ".?\"'":
        text += "."
    return template.replace("{instruction}", text)


#: Characters read of a text per token of its budget before it is tokenised. Ordinary text averages 3-6
#: characters a token (code and tables fewer, a word piece of the vocabulary at most ~20), so the first
#: ``budget`` tokens of any such text lie well inside the first ``budget * CHARS_PER_TOKEN`` characters, and
#: what lies beyond is never tokenised: a 5 MB query costs what a 10 KB one does.
CHARS_PER_TOKEN = 48

#: Character span of every token of a text (no special tokens).
Spans = list[tuple[int, int]]


def char_budget(tokens: int) -> int:
    """How many leading characters of a text are tokenised to find its first ``tokens`` tokens."""
    return tokens * CHARS_PER_TOKEN


def cut_to_budget(
    texts: Sequence[str], budget: int, spans: Callable[[list[str]], list[Spans]]
) -> tuple[list[str], int]:
    """``texts`` with each cut after its first ``budget`` tokens, and how many were cut. A template's ending
    must survive truncation: it asks for the task.

    Only the first :func:`char_budget` characters of a text are tokenised (``spans`` gives each token's
    character span). The cut is the token-level one whenever the first ``budget + 1`` tokens of that head
    lie in words before its last two (the only ones a character cut can change: a split word, a
    pre-tokenizer's look-ahead), as they do in ordinary text: the same text, the same warning, as
    tokenising it whole. A head too sparse in tokens for that (a word of thousands of letters, a long run
    of blank space) is itself the cut, and counted as cut: text past the head is never read.
    """
    out = list(texts)
    # A token spans at least one character for the tokenizers we meet, but a character can be several
    # tokens, so only strings longer than the budget in characters / 4 need checking.
    long_ids = [i for i, t in enumerate(out) if len(t) > budget // 4]
    if not long_ids:
        return out, 0
    limit = char_budget(budget)
    heads = [out[i][:limit] for i in long_ids]
    cut = 0
    for i, head, offsets in zip(long_ids, heads, spans(heads), strict=True):
        whole = len(head) == len(out[i])
        if len(offsets) > budget:
            out[i] = head[: offsets[budget - 1][1]]
            cut += 1
        elif not whole:
            out[i] = head
            cut += 1
    return out, cut

