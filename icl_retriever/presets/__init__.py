"""Named models shipped in the package (presets): one registry that every entry point reads.

A preset is the packaged base weights (all-MiniLM-L6-v2, see :mod:`icl_retriever.default_model`) plus,
for a trained one, a float16 weight difference with its settings, training card and calibrated floor in
one directory of the package. The names are the ones :class:`~icl_retriever.encoder.PIEEncoder`, the CLI's
``--model`` / ``--base-model``, ``Retriever.from_index`` (which loads them on a manifest's word), the ONNX
cache and ``min_score="auto"`` accept:

- ``default``: the shipped default (IEB silver + SNI train): tasks across source datasets and wordings;
- ``ieb``: the first shipped default (IEB silver only): the PIE paper's fine-grained ``verb|noun`` tasks;
- ``default-base``: the untrained base, plain text: topical embeddings (the topic vectors of an index).

A string that is not a preset is a model directory when one exists there, and a Hugging Face id when it
contains ``/``; anything else is an unknown preset name (:func:`resolve_name`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from icl_retriever import default_model
from icl_retriever.errors import ModelLoadError

#: The preset an encoder loads when no model is named.
DEFAULT = "default"
#: The untrained base weights with plain text (no template): topical embeddings.
BASE = "default-base"

HERE = Path(__file__).resolve().parent
DELTA_FILE = "delta.safetensors"
CONFIG_FILE = "pie_config.json"
CARD_FILE = "training_card.json"


class Preset(BaseModel):
    """One named model shipped in the package."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="what PIEEncoder, --model and an index manifest call it")
    description: str = Field(description="one line: what notion of a task it holds, for `info` and the docs")
    directory: Path | None = Field(
        description="the packaged directory holding delta.safetensors, pie_config.json, training_card.json and "
        "calibration.json; None for the base weights alone"
    )
    source: str = Field(description="where the weights come from (a training run, a commit), for the model card")

    @property
    def delta_file(self) -> Path | None:
        """The float16 weight difference added to the base, or None for the base itself."""
        return None if self.directory is None else self.directory / DELTA_FILE

    @property
    def trained(self) -> bool:
        """Whether it carries a PIE-trained delta (its topic vectors then come from the base model)."""
        return self.directory is not None

    def settings(self) -> dict[str, Any]:
        """Template, pooling, max length and period rule it was measured with (read without loading it)."""
        if self.directory is None:
            return dict(default_model.BASE_CONFIG)
        return json.loads((self.directory / CONFIG_FILE).read_text(encoding="utf-8"))

    def training_card(self) -> dict[str, Any] | None:
        """The training card of its delta (None for the base)."""
        if self.directory is None:
            return None
        return json.loads((self.directory / CARD_FILE).read_text(encoding="utf-8"))

    def files(self) -> list[Path]:
        """The packaged files that decide its vectors besides the base weights (delta and settings)."""
        if self.directory is None:
            return []
        return [p for p in (self.directory / DELTA_FILE, self.directory / CONFIG_FILE) if p.is_file()]

    def load(self) -> tuple[Any, Any, dict[str, Any]]:
        """Tokenizer, model (verified base weights plus its delta) and its settings; offline.

        Raises:
            ModelLoadError: the base package is missing or not the pinned release, or the delta does not fit it.
        """
        tokenizer, model = default_model.load_base(self.delta_file)
        return tokenizer, model, self.settings()


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name=DEFAULT,
            description="IEB silver + SNI train (run J): tasks across source datasets and wordings; for most apps",
            directory=default_model.HERE,
            source="run J, shipped in de75388",
        ),
        Preset(
            name="ieb",
            description="IEB silver only: the PIE paper's fine-grained verb|noun tasks ('write a poem' vs 'write a story')",
            directory=HERE / "ieb",
            source="the first shipped default (600 steps on eft_train_silver.json), recovered from commit 04be15e",
        ),
        Preset(
            name=BASE,
            description="the untrained base, plain text: topical embeddings (the topic vectors of an index)",
            directory=None,
            source="all-MiniLM-L6-v2 from the PyPI package " + default_model.BASE_PIP,
        ),
    )
}


def names() -> list[str]:
    """The preset names, the default first."""
    return list(PRESETS)


def find(name: str | None) -> Preset | None:
    """The preset called ``name``, or None when it is not one."""
    return PRESETS.get(name) if name is not None else None


def get(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ModelLoadError: no preset has that name (one line listing those that exist).
    """
    found = PRESETS.get(name)
    if found is None:
        raise ModelLoadError(
            f"unknown model {name!r}: not a preset ({', '.join(names())}) nor an existing directory; "
            "a Hugging Face id is owner/name (e.g. google-bert/bert-base-uncased for bert-base-uncased)"
        )
    return found


def resolve_name(model: str | Path | None) -> str:
    """The name an encoder records for ``model``: a preset's name (None means :data:`DEFAULT`), the absolute
    path of an existing local directory or file, or a Hugging Face id (a string with ``/``).

    Raises:
        ModelLoadError: a bare name (no ``/``) that is neither a preset nor an existing path.
    """
    if model is None:
        return DEFAULT
    text = str(model)
    if text in PRESETS:
        return text
    local = Path(text).expanduser()
    if local.exists():
        return str(local.resolve())
    if isinstance(model, Path) or "/" in text or "\\" in text:
        return text  # a hub id (owner/name), or a path that is not there: transformers says which
    return get(text).name  # raises: an unknown preset name
