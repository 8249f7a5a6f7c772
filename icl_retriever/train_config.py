"""The settings of one training run (:class:`TrainConfig`), apart from the training code so that reading
them (the CLI builds its ``train`` flags from the fields) does not import torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from icl_retriever import presets
from icl_retriever.encoder import Pooling

#: Optimizer steps when neither ``steps`` nor ``epochs`` is given: about one epoch of eft_train_silver.json.
DEFAULT_STEPS = 500
#: Defaults for fitting a labelled demo pool (``label_field``), where no held-out benchmark guards the start.
POOL_FIT: dict[str, Any] = {"eval_every": 10, "patience": 3, "distill": 20.0}


class TrainConfig(BaseModel):
    """Hyper-parameters of one training run; all of them are written to the training card."""

    model_config = ConfigDict(extra="forbid")

    train_files: list[Path] = Field(
        min_length=1, description="IEB dict JSON, JSONL with instruction + task, or (with label_field) demo pools"
    )
    mix: list[float] | None = Field(
        None, description="share of each train file's anchors in every batch (default: equal shares)"
    )
    label_field: str | None = Field(None, description="read train files as demo pools labelled by this metadata field")
    with_input: bool = Field(False, description="also train on 'instruction + input' of samples that have an input")
    lead_sentences: int = Field(
        0, ge=0, description="also train on the first N sentences of every longer instruction (training tasks only):"
        " a short request's view of a long task definition (0: off)",
    )
    val_files: list[Path] = Field(
        default_factory=list, description="extra validation files (IEB format; cross-group P@1 if samples carry dataset)"
    )
    distill: float | None = Field(
        None, ge=0, description="weight of 1 - cos(trained, starting model) on every batch text: keeps the start's "
        f"geometry (default 0; {POOL_FIT['distill']} with label_field)"
    )
    output_dir: Path
    base_model: str = Field(
        "default", description=f"where fitting starts: a preset ({', '.join(presets.names())}), a model directory or a "
        "Hugging Face id owner/name (anything PIEEncoder accepts)"
    )
    template: str = Field("short", description="template name or text with {instruction}")
    pooling: Pooling = "mean"
    max_length: int = Field(128, ge=8)
    add_period: bool | None = Field(None, description="None: the encoder's default for the template")
    batch_size: int = Field(32, ge=2, description="anchors per forward pass; in-batch negatives come from it")
    steps: int | None = Field(None, ge=1, description=f"optimizer steps; default {DEFAULT_STEPS} unless epochs")
    epochs: float | None = Field(None, gt=0, description="passes over all anchor instructions, instead of steps")
    lr: float = Field(3e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; None disables it")
    temperature: float = Field(0.05, gt=0)
    grad_accum: int = Field(1, ge=1, description="forward passes per optimizer step")
    hard_negatives: bool = True
    hard_negative_facets: Literal["verb_or_noun", "verb", "noun"] = Field(
        "verb_or_noun",
        description="what a hard negative shares with the anchor's task; the paper's verb_or_noun also pushes apart"
        " verb synonyms of one noun (write|poem vs compose|poem), which silver labels do not merge",
    )
    group_negatives: bool = Field(
        False, description="in files with groups (SNI's dataset), take a hard negative from another task of the "
        "anchor's group where there is one: wording shared within a dataset must not decide the task",
    )
    mask_same_task: bool = True
    mask_shared_noun: bool = Field(
        False, description="drop in-batch negatives whose verb|noun task shares the anchor's noun: silver labels do "
        "not merge verb synonyms (write|poem, compose|poem, generate|poem), so these are often the same task",
    )
    symmetric: bool = False
    # Off by default, measured: 60 steps on eft_train_silver.json, held-out tasks, seeds 0 / 1: dropout off gave
    # P@1 0.993 / 0.982 and ARI 0.891 / 0.914; on (SimCSE's and PIE's setting) 0.993 / 0.979 and 0.869 / 0.816.
    dropout: bool = Field(False, description="train in model.train() mode (dropout on)")
    seed: int = 0
    split_seed: int | None = Field(
        None, description="seed of the held-out task split (default: seed); fix it to compare training seeds on "
        "the same held-out tasks",
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="fraction of train-file TASKS held out")
    eval_every: int | None = Field(
        None, ge=0, description=f"validate every N steps and keep the best; 0: only at the end (default 0; "
        f"{POOL_FIT['eval_every']} with label_field)"
    )
    patience: int | None = Field(
        None, ge=0, description=f"stop after N validations without a better score; 0: never (default 0; "
        f"{POOL_FIT['patience']} with label_field)"
    )
    device: str | None = None
    freeze_embeddings: bool = Field(True, description="freeze embedding matrices: smaller delta, less overfit")
    ema: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights (this decay per step) and "
        "validate, select and save the average instead of the last step: smooths the noise of the final steps",
    )
    freeze_layers: int = Field(
        0, ge=0, description="also freeze the first N transformer layers: the lower layers keep the start's "
        "general features, only the upper ones learn the task labels (0: train all)",
    )
    lora_rank: int = Field(
        0, ge=0, description="train low-rank adapters of this rank on every linear layer instead of the full "
        "weights (needs the 'lora' extra, peft), merged into the saved model: a change of low rank keeps more of "
        "the start (0: full fine-tuning)",
    )
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scale numerator (default: 2 x lora_rank)")

    @property
    def held_out_seed(self) -> int:
        """The seed that chooses the held-out tasks."""
        return self.seed if self.split_seed is None else self.split_seed

    @model_validator(mode="before")
    @classmethod
    def _one_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and "train_file" in data:
            data = dict(data)
            if "train_files" in data:
                raise ValueError("give train_file or train_files, not both")
            data["train_files"] = [data.pop("train_file")]
        return data

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if self.mix is not None and (len(self.mix) != len(self.train_files) or min(self.mix) <= 0):
            raise ValueError(f"mix needs one positive share per train file ({len(self.train_files)}), got {self.mix}")
        if self.lora_rank and self.freeze_layers:
            raise ValueError("lora_rank and freeze_layers both choose what trains; give one")
        if self.lora_alpha is not None and not self.lora_rank:
            raise ValueError("lora_alpha needs lora_rank")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.steps is None and self.epochs is None:
            self.steps = DEFAULT_STEPS
        # Fitting a user's own pool starts from a model that already works: validate often, stop as soon as
        # held-out labels stop improving, and stay near the start so other notions of task survive.
        defaults = POOL_FIT if self.label_field else {"eval_every": 0, "patience": 0, "distill": 0.0}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self
