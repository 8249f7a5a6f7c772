"""Demos as chat messages: the alternating user / assistant turns that chat-completion APIs take."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

from icl_retriever.records import Demo


class ChatMessage(TypedDict):
    """One turn of a chat-completion request (OpenAI, Anthropic, llama.cpp and most others take this shape)."""

    role: Literal["user", "assistant"]
    content: str


def user_turn(demo: Demo) -> str:
    """What the user said in a demo: its instruction, then its input (if any) after a blank line."""
    return f"{demo.instruction}\n\n{demo.input}" if demo.input else demo.instruction


def demo_messages(demos: Sequence[Demo]) -> list[ChatMessage]:
    """Each demo as a user turn (instruction and input) followed by an assistant turn (its output), best
    demo first, ready to precede the real request in a chat-completion call."""
    messages: list[ChatMessage] = []
    for demo in demos:
        messages.append({"role": "user", "content": user_turn(demo)})
        messages.append({"role": "assistant", "content": demo.output})
    return messages
