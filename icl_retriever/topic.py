"""Topic vectors: which encoder makes them for an index, and how the manifest records it.

A topic vector says what a demo's instruction and input are about; it is kept beside the PIE vectors so
that ``rerank="task_then_topic"`` can order demos of the query's task by content. For the embedded
default it is the untrained base model's plain embedding (``"default-base"``, no template, loaded once
per process); for any other model it is the same model without its template. ``topic="static"`` asks
for :class:`~icl_retriever.encoder.static.StaticEmbedder` vectors instead (no forward pass: builds about
twice as fast, a slightly worse LLM downstream; docs/benchmarks.md, "Choosing the default ranking"). An index is
always queried with the kind it was built with.
"""

from __future__ import annotations

import functools
from pathlib import Path
import threading
from typing import Any, Literal

from icl_retriever import presets
from icl_retriever.encoder import EncoderConfig, PIEEncoder, Runtime
from icl_retriever.encoder.static import StaticEmbedder
from icl_retriever.records import Demo
from icl_retriever.errors import EncoderMismatchError
from icl_retriever.store import TopicInfo, trusted_model

TopicSource = Literal["base_static", "base_model", "same_model_plain"]
#: What makes topic vectors: a PIE encoder without template, or the static embedder.
TopicEncoder = PIEEncoder | StaticEmbedder


@functools.cache
def shared_base_encoder(device: Any, runtime: Runtime = "torch") -> PIEEncoder:
    """The ``"default-base"`` encoder, loaded once per process, device and runtime."""
    return PIEEncoder("default-base", device=device, runtime=runtime)


@functools.cache
def shared_static_embedder() -> StaticEmbedder:
    """The static embedder of the packaged base model, loaded once per process (a 45 MiB table)."""
    return StaticEmbedder("default-base")


#: Which topic vectors an index gets: ``True`` or ``"contextual"`` (a forward pass: the base model's plain
#: embedding for the default, the model's own without template for any other), ``"static"`` (IDF-weighted
#: word-piece vectors of the packaged base, no forward pass; the default model only), ``False`` (none).
TopicKind = bool | Literal["static", "contextual"]


def check_topic_kind(topic: Any, model: str | None = None) -> TopicKind:
    """``topic`` if it is a :data:`TopicKind` (one ``model`` can make, when given: a model name is enough,
    so the check runs before the model loads).

    Raises:
        ValueError: anything else, or ``"static"`` for a model other than a trained preset.
    """
    if not (isinstance(topic, bool) or (isinstance(topic, str) and topic in ("static", "contextual"))):
        raise ValueError(f"topic must be True, False, 'static' or 'contextual', got {topic!r}")
    preset = presets.find(model)
    if topic == "static" and model is not None and not (preset is not None and preset.trained):
        raise ValueError(
            f"static topic vectors are made for the trained presets ({', '.join(_trained_presets())}) only, not "
            f"{model!r}; use topic='contextual' (or True)"
        )
    return topic  # type: ignore[return-value]


def _trained_presets() -> list[str]:
    return [p.name for p in presets.PRESETS.values() if p.trained]


def default_topic_encoder(encoder: PIEEncoder, kind: TopicKind = True) -> tuple[TopicEncoder, TopicSource]:
    """The encoder of topic vectors for an index of ``encoder``, and which kind it is.

    Raises:
        ValueError: ``kind`` is ``"static"`` for a model other than a trained preset, or not a kind.
    """
    kind = check_topic_kind(kind, encoder.config.model)
    if kind is False:
        raise ValueError("no topic encoder for topic=False")
    preset = presets.find(encoder.config.model)
    packaged = preset is not None and preset.trained  # a trained preset: its base is the packaged base
    if packaged and kind == "static":
        return shared_static_embedder(), "base_static"
    if packaged:
        return shared_base_encoder(str(encoder.device), encoder.runtime), "base_model"
    return encoder.with_template("plain"), "same_model_plain"


def topic_encoder_or_none(
    encoder: PIEEncoder, topic: TopicKind
) -> tuple[TopicEncoder, TopicSource] | tuple[None, None]:
    """:func:`default_topic_encoder` for a build's ``topic`` setting: ``(None, None)`` for ``False``.

    Raises:
        ValueError: not a topic kind, or one the model has not.
    """
    return default_topic_encoder(encoder, topic) if check_topic_kind(topic) else (None, None)


def topic_encoder_for(config: EncoderConfig, source: TopicSource, *, device: Any = None,
                      runtime: Runtime = "torch") -> TopicEncoder:
    """The topic encoder a manifest's config and source describe (for a process that has none yet)."""
    if source == "base_static":
        return shared_static_embedder() if config.model == "default-base" else StaticEmbedder(config.model)
    return PIEEncoder.from_config(config, device=device, runtime=runtime)


def load_topic_encoder(info: TopicInfo, encoder: PIEEncoder, own_models: set[str], path: Path | None) -> TopicEncoder:
    """The encoder that made an index's topic vectors (``info``), for queries by a retriever of ``encoder``.

    The base model and the index's own model (``own_models``: the encoder's and the manifest's) load on
    the manifest's word; any other model it names only as the index's own model would (inside ``path``).

    Raises:
        EncoderMismatchError: the encoder that loads is not the one that made the topic vectors.
        ModelLoadError: the named model is not trusted or cannot be loaded.
    """
    cfg = info.encoder
    enc: TopicEncoder
    if info.source == "base_static" and cfg.model == "default-base":
        enc = shared_static_embedder()
    elif info.source == "base_model" and cfg.model == "default-base":
        enc = shared_base_encoder(str(encoder.device), encoder.runtime)
    elif info.source == "same_model_plain" and cfg.model in own_models:
        enc = encoder.with_template(cfg.template, add_period=cfg.add_period)
    else:  # a model the manifest names: trusted only as the index's own would be
        name = cfg.model if path is None else trusted_model(path, cfg.model)
        enc = topic_encoder_for(cfg.model_copy(update={"model": name}), info.source, runtime=encoder.runtime)
    if enc.fingerprint != info.fingerprint:
        raise EncoderMismatchError(
            f"{path or 'index'}: topic vectors were made by encoder {info.fingerprint} ({cfg.model!r}), "
            f"but the one that loads now is {enc.fingerprint}; rebuild the index"
        )
    return enc


def topic_info(topic_encoder: TopicEncoder, source: TopicSource) -> TopicInfo:
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

    def __init__(self, encoder: PIEEncoder, loaded: TopicEncoder | None = None) -> None:
        self._encoder = encoder
        self._loaded = loaded
        self._lock = threading.Lock()

    def get(self, info: TopicInfo | None, manifest_model: str | None, path: Path | None) -> TopicEncoder:
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
