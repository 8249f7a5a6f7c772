"""Named presets shipped in the package: each loads offline, reproduces its training run, carries its own
floor, and an index built with it reloads with it without naming it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from icl_retriever import PIEEncoder, Retriever, build_index, default_model, presets
from icl_retriever.calibration import load as load_calibration
from icl_retriever.cli import main
from icl_retriever.encoder import onnx
from icl_retriever.errors import ModelLoadError
from icl_retriever.store import load_manifest, trusted_model
from icl_retriever.training import TrainConfig

FIXTURES = Path(__file__).parent / "fixtures"
TRAINED = [name for name, p in presets.PRESETS.items() if p.trained]
POOL = [
    {"instruction": "Translate 'good night' into German.", "output": "Gute Nacht.", "metadata": {"task": "translate"}},
    {"instruction": "Translate 'thank you' into French.", "output": "Merci.", "metadata": {"task": "translate"}},
    {"instruction": "Write a poem about the sea.", "output": "Waves...", "metadata": {"task": "poem"}},
    {"instruction": "Summarize the article below.", "input": "Rain fell.", "output": "It rained.",
     "metadata": {"task": "summarize"}},
]


@pytest.fixture(scope="module")
def ieb() -> PIEEncoder:
    """The ``ieb`` preset, loaded once (torch: the vectors its training card's probes were made with)."""
    return PIEEncoder("ieb", runtime="torch")


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No Hugging Face hub: a preset must load from the installed packages alone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield


def _encoder(name: str, default: PIEEncoder, ieb: PIEEncoder) -> PIEEncoder:
    return {"default": default, "ieb": ieb}[name]


def test_the_registry_names_each_preset_once() -> None:
    assert presets.names() == ["default", "ieb", "default-base"]
    assert presets.DEFAULT == "default" and presets.get("default").directory == default_model.HERE
    assert TRAINED == ["default", "ieb"]
    for preset in presets.PRESETS.values():
        assert preset.description and preset.source and "\n" not in preset.description


@pytest.mark.parametrize("name", ["iebb", "Default", "my-model"])
def test_an_unknown_preset_is_a_one_line_error_listing_the_names(name: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        PIEEncoder(name)
    message = str(err.value)
    assert "\n" not in message and repr(name) in message
    assert all(known in message for known in presets.names())


def test_the_cli_reports_an_unknown_preset_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "iebb", "--pool", str(FIXTURES.parents[1] / "examples" / "demos.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'iebb'" in err and "default, ieb, default-base" in err
    with pytest.raises(SystemExit):  # demo takes presets only: argparse lists the choices
        main(["demo", "--model", "iebb"])
    err = capsys.readouterr().err
    assert "invalid choice: 'iebb'" in err and all(known in err for known in presets.names())


def test_names_that_are_not_presets_keep_their_meaning(tmp_path: Path) -> None:
    assert presets.resolve_name(None) == "default"
    assert presets.resolve_name("ieb") == "ieb"
    assert presets.resolve_name("owner/model") == "owner/model"  # a Hugging Face id, as before
    (tmp_path / "ieb").mkdir()  # a directory named like a preset is reached by its path
    assert presets.resolve_name(tmp_path / "ieb") == str(tmp_path / "ieb")
    assert presets.resolve_name(str(tmp_path)) == str(tmp_path.resolve())


@pytest.mark.parametrize("name", TRAINED)
def test_each_trained_preset_ships_a_small_delta_with_its_card(name: str) -> None:
    preset = presets.get(name)
    assert preset.delta_file is not None and preset.delta_file.stat().st_size <= 25 * 2**20
    with safe_open(str(preset.delta_file), framework="pt") as fh:
        assert fh.metadata()["base_sha256"] == default_model.BASE_SHA256
        assert not any("word_embeddings" in n for n in fh.keys())  # noqa: SIM118 (safe_open is not a dict)
    card = preset.training_card()
    assert card is not None and card["base_weights_sha256"] == default_model.BASE_SHA256 and card["steps_done"] > 0
    config = TrainConfig.model_validate(card["config"])  # a card names the files its held-out tasks come from
    assert any(Path(p).name == "eft_train_silver.json" for p in config.train_files)
    assert preset.settings()["template"] == 'This sentence of "{instruction}" means:'


def test_ieb_is_the_ieb_only_run(ieb: PIEEncoder) -> None:
    card = presets.get("ieb").training_card()
    assert card is not None and card["train_file"].endswith("eft_train_silver.json") and card["steps_done"] == 600
    assert ieb.config.model == "ieb" and ieb.config.max_length == 256 and ieb.config.pooling == "mean"


@pytest.mark.parametrize("name", TRAINED)
def test_each_preset_reproduces_its_training_probes_offline(
    name: str, offline: None, encoder: PIEEncoder, ieb: PIEEncoder
) -> None:
    ref = json.loads((FIXTURES / f"{name}_reference.json").read_text(encoding="utf-8"))
    loaded = PIEEncoder(name, runtime="torch") if name != "default" else encoder  # offline from the package
    got = loaded.encode(ref["texts"])
    assert float(np.abs(got - np.asarray(ref["embeddings"], dtype=np.float32)).max()) <= 1e-3


def test_the_presets_are_different_models(encoder: PIEEncoder, ieb: PIEEncoder) -> None:
    texts = ["Write a poem about the sea.", "Write a story about the sea."]
    assert ieb.fingerprint != encoder.fingerprint
    assert float(np.abs(ieb.encode(texts) - encoder.encode(texts)).max()) > 1e-2
    # the IEB notion keeps a poem and a story apart more than the default does
    a, b = ieb.encode(texts), encoder.encode(texts)
    assert float(a[0] @ a[1]) < float(b[0] @ b[1])


@pytest.mark.parametrize("name", TRAINED)
def test_each_preset_has_its_own_calibrated_floor(name: str, encoder: PIEEncoder, ieb: PIEEncoder) -> None:
    model = _encoder(name, encoder, ieb)
    stored = load_calibration(presets.get(name).directory)  # type: ignore[arg-type]
    assert stored is not None and stored.fingerprint == model.fingerprint and stored.target_precision == 0.9
    assert model.calibrated_floor() == stored.min_score
    floors = {load_calibration(presets.get(n).directory).min_score for n in TRAINED}  # type: ignore[arg-type,union-attr]
    assert len(floors) == len(TRAINED)


def test_each_preset_is_its_own_onnx_cache_entry() -> None:
    default_files, ieb_files = onnx.source_files("default"), onnx.source_files("ieb")
    assert default_files and ieb_files and default_files != ieb_files
    assert presets.get("ieb").delta_file in ieb_files and presets.get("ieb").delta_file not in default_files
    assert onnx.entry_dir("default", "mean", True) != onnx.entry_dir("ieb", "mean", True)


@pytest.mark.parametrize("name", presets.names())
def test_presets_load_on_the_manifests_word(name: str, tmp_path: Path) -> None:
    assert trusted_model(tmp_path, name) == name


@pytest.mark.parametrize("name", TRAINED)
def test_an_index_built_with_a_preset_reloads_with_it(
    name: str, tmp_path: Path, encoder: PIEEncoder, ieb: PIEEncoder, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _encoder(name, encoder, ieb)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in POOL), encoding="utf-8")
    out = tmp_path / "idx"
    build_index(pool, out, encoder=model, topic="static")
    manifest = load_manifest(out)
    assert manifest.encoder.model == name and manifest.fingerprint == model.fingerprint
    reloaded = Retriever.from_index(out, runtime="torch")  # no model named: the manifest's preset loads
    assert reloaded.encoder.config.model == name and reloaded.encoder.fingerprint == model.fingerprint
    assert [d.metadata["task"] for d in reloaded.get_demos("Translate 'hello' into Spanish.", k=2)] == ["translate"] * 2
    assert main(["info", str(out)]) == 0
    shown = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model"))
    assert f" {name} (preset: {presets.get(name).description})" in shown


def test_training_starts_from_a_preset(tmp_path: Path, encoder: PIEEncoder, ieb: PIEEncoder) -> None:
    """``train --base-model ieb`` fits from the ieb weights and still writes a delta to the packaged base."""
    from icl_retriever.cache import sha256_file
    from icl_retriever.training import train

    config = TrainConfig(train_file=FIXTURES / "tiny_tasks.jsonl", output_dir=tmp_path / "m", steps=1, batch_size=4,
                         val_fraction=0, base_model="ieb", lr=1e-6)
    out = train(config, show_progress_bar=False)
    card = json.loads((out / "training_card.json").read_text(encoding="utf-8"))
    ieb_delta = presets.get("ieb").delta_file
    assert ieb_delta is not None
    assert card["base_model"] == "ieb" and card["base_delta_sha256"] == sha256_file(ieb_delta)
    assert card["base_weights_sha256"] == default_model.BASE_SHA256
    texts = ["Write a poem about the sea.", "Summarize the article below."]
    fitted = PIEEncoder(out, runtime="torch").encode(texts)
    assert float(np.abs(fitted - ieb.encode(texts)).max()) < float(np.abs(fitted - encoder.encode(texts)).max())
    _, rebuilt = default_model.load_base(out / "delta.safetensors")  # the shippable delta is to the packaged base
    trained = load_file(out / "model.safetensors")
    params = rebuilt.state_dict()
    assert max(float((params[k].float() - trained[k].float()).abs().max()) for k in trained if k in params) <= 1e-2
