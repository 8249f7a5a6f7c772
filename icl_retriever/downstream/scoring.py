"""Prompts with demos, and scoring a gold output (NLL per token) or a closed set of options with the LM."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from icl_retriever.records import Demo

from icl_retriever.downstream.models import CausalLM


def format_demo(demo: Demo, *, with_output: bool = True) -> str:
    """``Instruction: ...\\nInput: ...\\nOutput: ...``; the Input line is left out when the input is empty
    (an empty ``Input:`` line only adds tokens); without output the text ends at ``Output:``."""
    lines = [f"Instruction: {demo.instruction.strip()}"]
    if demo.input.strip():
        lines.append(f"Input: {demo.input.strip()}")
    lines.append(f"Output: {demo.output.strip()}" if with_output else "Output:")
    return "\n".join(lines)


def format_prompt(demos: Sequence[Demo], query: Demo) -> tuple[str, str]:
    """The demo block and the query part of a prompt (their concatenation is the prompt).

    Demos come in rank order (best first) and are written best *last*, next to the query: models weigh
    the nearest demo most, and truncation from the left then drops the weakest demo first.

    Returns:
        ``(demo_block, query_text)``; the block is ``""`` or ends with the blank line before the query.
    """
    block = "".join(format_demo(d) + "\n\n" for d in reversed(demos))
    return block, format_demo(query, with_output=False)


@dataclass(frozen=True)
class ScoreItem:
    """One sequence to score: the prompt's token ids then the target's; the last ``n_target`` are scored."""

    ids: tuple[int, ...]
    n_target: int


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt + target, and whether the demo block had to be cut to fit."""

    item: ScoreItem
    prompt_tokens: int
    truncated: bool


class LMScorer:
    """Per-token log-likelihoods of targets given prompts under a causal LM.

    Sequences are scored in batches, longest first, left-padded with explicit position ids so a
    sequence scores the same (up to float rounding) alone or in any batch; only the target positions'
    logits are computed (``logits_to_keep``), which matters with 262k-token vocabularies.

    Args:
        lm: the model.
        max_prompt_tokens: prompt budget (special tokens + demos + query, not the target). The demo
            block is cut from the left to fit; the query is never cut.
        batch_size: sequences per forward pass.
    """

    def __init__(self, lm: CausalLM, *, max_prompt_tokens: int = 1024, batch_size: int = 4) -> None:
        if max_prompt_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_prompt_tokens and batch_size must be >= 1, got {max_prompt_tokens}, {batch_size}")
        self.lm = lm
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = batch_size
        tok = lm.tokenizer
        self._pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
        self._prefix = self._special_prefix()
        params = inspect.signature(lm.model.forward).parameters
        self._keep_arg = "logits_to_keep" in params
        self._position_arg = "position_ids" in params

    def _special_prefix(self) -> list[int]:
        """The special tokens the tokenizer puts before a text (BOS for Gemma / Llama, none for GPT-2)."""
        with_special = self._ids("x", special=True)
        bare = self._ids("x")
        for start in range(len(with_special) - len(bare) + 1):
            if with_special[start : start + len(bare)] == bare:
                return with_special[:start]
        return []

    def _ids(self, text: str, *, special: bool = False) -> list[int]:
        return list(self.lm.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _split(self, context: str, target: str) -> tuple[list[int], list[int]]:
        """Token ids of ``context`` and ``target`` as they come out of tokenizing ``context + target``
        (as lm-evaluation-harness does), so the target's first token is the one the model would emit."""
        ctx = self._ids(context)
        whole = self._ids(context + target)
        if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
            return ctx, whole[len(ctx) :]
        return ctx, self._ids(target)

    def build(self, demos: Sequence[Demo], query: Demo, target: str) -> PromptTokens:
        """Tokenize the prompt for ``query`` with ``demos`` and the ``target`` text (e.g. the gold output).

        Raises:
            ValueError: the target is empty after tokenization.
        """
        block, query_text = format_prompt(demos, query)
        query_ids, target_ids = self._split(query_text, " " + target.strip())
        if not target_ids:
            raise ValueError(f"query {query.id!r}: target {target!r} has no tokens")
        demo_ids = self._ids(block) if block else []
        room = max(0, self.max_prompt_tokens - len(self._prefix) - len(query_ids))
        truncated = len(demo_ids) > room
        if truncated:
            demo_ids = demo_ids[len(demo_ids) - room :] if room else []
        prompt = self._prefix + demo_ids + query_ids
        return PromptTokens(ScoreItem(tuple(prompt + target_ids), len(target_ids)), len(prompt), truncated)

    def score(self, items: Sequence[ScoreItem], *, show_progress_bar: bool = False) -> list[np.ndarray]:
        """Log-probabilities (float64) of each item's target tokens, in item order."""
        for item in items:
            if not 0 < item.n_target < len(item.ids):
                raise ValueError(
                    f"an item needs at least one prompt and one target token, got {item.n_target} of {len(item.ids)}"
                )
        order = sorted(range(len(items)), key=lambda i: (-len(items[i].ids), i))
        out: list[np.ndarray] = [np.empty(0)] * len(items)
        with torch.inference_mode(), tqdm(
            total=len(items), desc="Scoring", unit=" seq", disable=not show_progress_bar
        ) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                for i, logprobs in zip(idx, self._forward([items[i] for i in idx]), strict=True):
                    out[i] = logprobs
                bar.update(len(idx))
        return out

    def _forward(self, batch: Sequence[ScoreItem]) -> list[np.ndarray]:
        width = max(len(item.ids) for item in batch)
        keep = max(item.n_target for item in batch) + 1  # logits at t predict token t + 1
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            input_ids[row, width - len(item.ids) :] = torch.tensor(item.ids, dtype=torch.long)
            mask[row, width - len(item.ids) :] = 1
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
        if self._position_arg:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if self._keep_arg:
            kwargs["logits_to_keep"] = keep
        kwargs = {name: value.to(self.lm.device) if torch.is_tensor(value) else value for name, value in kwargs.items()}
        logits = self.lm.model(**kwargs).logits[:, -keep:, :]
        results = []
        for row, item in enumerate(batch):
            n = item.n_target
            predicted = logits[row, keep - n - 1 : keep - 1].float().log_softmax(-1)
            targets = input_ids[row, width - n :].to(predicted.device)
            results.append(predicted.gather(-1, targets[:, None])[:, 0].double().cpu().numpy())
        return results


# --------------------------------------------------------------------------------- closed label sets


class ClosedLabelRule(BaseModel):
    """When a label's gold outputs form a closed answer set worth scoring as multiple choice.

    The defaults catch classification tasks (sentiment, topic, intent, language id ...) and leave out
    free-form ones, whose outputs are long or all different.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_samples: int = Field(5, ge=2, description="demos of the label needed to trust its answer set")
    max_options: int = Field(10, ge=2, description="most distinct outputs a closed set may have")
    max_words: int = Field(4, ge=1, description="longest option, in words")
    max_chars: int = Field(32, ge=1, description="longest option, in characters")


def _label(demo: Demo, field: str) -> str | None:
    value = demo.metadata.get(field)
    return None if value is None else str(value)


def closed_label_options(
    demos: Iterable[Demo], label_field: str = "task", rule: ClosedLabelRule | None = None
) -> dict[str, list[str]]:
    """The labels whose (stripped) gold outputs take few distinct short values, with those values sorted."""
    rule = rule or ClosedLabelRule()
    outputs: dict[str, list[str]] = {}
    for demo in demos:
        label = _label(demo, label_field)
        if label is not None and demo.output.strip():
            outputs.setdefault(label, []).append(demo.output.strip())
    closed = {}
    for label, values in outputs.items():
        distinct = sorted(set(values))
        short = all(len(v) <= rule.max_chars and len(v.split()) <= rule.max_words for v in distinct)
        if len(values) >= rule.min_samples and 2 <= len(distinct) <= rule.max_options and short:
            closed[label] = distinct
    return closed


OptionScore = Literal["total", "mean"]


def pick_option(
    options: Sequence[str], scorer: Callable[[str], Sequence[float] | np.ndarray], *, normalize: OptionScore = "total"
) -> str:
    """The option the LM finds most likely; the first one in ``options`` wins ties.

    ``"total"`` (the default) compares the summed token log-likelihoods, i.e. log P(option | prompt), the
    probability of the model answering exactly that. ``"mean"`` divides by the token count; it suits long
    free-form options, but on short labels it favours options split into many tokens whose tails are
    near-certain after the first (``Neut`` + ``ral``).

    Args:
        options: the candidate answers.
        scorer: per-token log-likelihoods of an option given the prompt.
        normalize: ``"total"`` or ``"mean"``.
    """
    if not options:
        raise ValueError("no options to pick from")
    if normalize not in ("total", "mean"):
        raise ValueError(f"normalize must be 'total' or 'mean', got {normalize!r}")
    best, best_score = options[0], -math.inf
    for option in options:
        logprobs = np.asarray(scorer(option), dtype=np.float64)
        if logprobs.size == 0:
            raise ValueError(f"option {option!r} has no tokens to score")
        value = float(logprobs.sum() if normalize == "total" else logprobs.mean())
        if value > best_score:
            best, best_score = option, value
    return best
