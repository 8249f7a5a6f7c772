"""Topic vectors: which encoder makes them for an index, and how the manifest records it.

A topic vector is a plain sentence embedding of a demo's instruction and input, kept beside the PIE
vectors so that ``rerank="task_then_topic"`` can order demos of the query's task by topic. For the
embedded default the topic encoder is its untrained base (``"default-base"``, no template), loaded once
per process; for any other model it is the same model without its template.
"""

from __future__ import annotations

import functools
from pathlib import Path
import threading
from typing import Any, Literal

from icl_retriever.encoder import PIEEncoder, Runtime
from icl_retriever.records import Demo
from icl_retriever.errors import EncoderMismatchError
from icl_retriever.store import TopicInfo, trusted_model

TopicSource = Literal["base_model", "same_model_plain"]


@functools.cache
def shared_base_encoder(device: Any, runtime: Runtime = "torch") -> PIEEncoder:
    """The ``"default-base"`` encoder, loaded once per process, device and runtime."""
    return PIEEncoder("default-base", device=device, runtime=runtime)


def default_topic_encoder(encoder: PIEEncoder) -> tuple[PIEEncoder, TopicSource]:
    """The encoder of topic vectors for an index of ``encoder``, and which kind it is."""
    if encoder.config.model == "default":
        return shared_base_encoder(str(encoder.device), encoder.runtime), "base_model"
    return encoder.with_template("plain"), "same_model_plain"


def load_topic_encoder(info: TopicInfo, encoder: PIEEncoder, own_models: set[str], path: Path | None) -> PIEEncoder:
    """The encoder that made an index's topic vectors (``info``), for queries by a retriever of ``encoder``.

    The base model and the index's own model (``own_models``: the encoder's and the manifest's) load on
    the manifest's word; any other model it names only as the index's own model would (inside ``path``).

    Raises:
        EncoderMismatchError: the encoder that loads is not the one that made the topic vectors.
        ModelLoadError: the named model is not trusted or cannot be loaded.
    """
    cfg = info.encoder
    if info.source == "base_model" and cfg.model == "default-base":
        enc = shared_base_encoder(str(encoder.device), encoder.runtime)
    elif info.source == "same_model_plain" and cfg.model in own_models:
        enc = encoder.with_template(cfg.template, add_period=cfg.add_period)
    else:  # a model the manifest names: trusted only as the index's own would be
        name = cfg.model if path is None else trusted_model(path, cfg.model)
        enc = PIEEncoder.from_config(cfg.model_copy(update={"model": name}), runtime=encoder.runtime)
    if enc.fingerprint != info.fingerprint:
        raise EncoderMismatchError(
            f"{path or 'index'}: topic vectors were made by encoder {info.fingerprint} ({cfg.model!r}), "
            f"but the one that loads now is {enc.fingerprint}; rebuild the index"
        )
    return enc


def topic_info(topic_encoder: PIEEncoder, source: TopicSource) -> TopicInfo:
    """What the manifest records of a topic encoder."""
    return TopicInfo(encoder=topic_encoder.config, fingerprint=topic_encoder.fingerprint, source=source, dim=topic_encoder.dim)


def topic_text(demo: Demo) -> str:
    """What a topic vector embeds: the instruction, then the input on the next line when there is one."""
    return f"{demo.instruction}\n{demo.input}" if demo.input else demo.instruction


def no_topic_message(path: Path | None) -> str:
    """Why ``rerank="task_then_topic"`` cannot run on an index without topic vectors, and the fix."""
    where = f"{path}" if path else "this retriever"
    return (
        f"{where} has no topic vectors, which rerank='task_then_topic' needs (it was built with topic=False / "
        f"--no-topic, or by an older version); rebuild it with topic vectors: "
        f"icl-retriever build POOL --out {path or 'DIR'} --force (or build_index / Retriever.from_demos "
        f"with topic=True)"
    )


class TopicEncoderSlot:
    """The encoder of a retriever's topic vectors: loaded on first use, and again only when a newer
    version of the index names another (its fingerprint changed)."""

    def __init__(self, encoder: PIEEncoder, loaded: PIEEncoder | None = None) -> None:
        self._encoder = encoder
        self._loaded = loaded
        self._lock = threading.Lock()

    def get(self, info: TopicInfo | None, manifest_model: str | None, path: Path | None) -> PIEEncoder:
        """The topic encoder for ``info`` (the index's topic record), checked against its fingerprint.

        Raises:
            ValueError: the index has no topic vectors.
            EncoderMismatchError: the topic encoder that loads is not the one that made them.
        """
        if info is None:
            raise ValueError(no_topic_message(path))
        with self._lock:
            current = self._loaded
            if current is None or current.fingerprint != info.fingerprint:
                own = {self._encoder.config.model} | ({manifest_model} if manifest_model else set())
                current = self._loaded = load_topic_encoder(info, self._encoder, own, path)
            return current
