"""Hostile text at every door: lone surrogates and stray bytes are refused where they enter (pools, queries,
command-line arguments, manifests), and control characters never reach the terminal raw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icl_retriever import IndexFormatError, PIEEncoder, PoolError, Retriever, build_index
from icl_retriever.cli import main
from icl_retriever.store import MANIFEST_FILE

ESCAPES = ["\x1b]0;pwned\x07", "\x1b[31m", "\x1b[2J", "\u202e", "\x9b"]  # title, colour, clear screen, bidi, CSI
POOL = [
    {"id": "p1", "instruction": "Write a poem about the sea.\x1b]0;pwned\x07", "output": "\x1b[31mWaves\x1b[0m",
     "task": "poem\x1b[2J"},
    {"id": "p2", "instruction": "Translate 'thanks' into German.\u202e", "input": "thanks\x9b", "output": "Danke",
     "task": "translate"},
]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, encoder: PIEEncoder) -> Path:
    out = tmp_path_factory.mktemp("text") / "idx"
    build_index(POOL, out, encoder=encoder, topic=False)
    return out


@pytest.fixture()
def no_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("text reached the encoder")

    monkeypatch.setattr(PIEEncoder, "encode", refuse)


# lone surrogates ------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["Write a haiku \ud83d", "\udcff\udcfe", "ok \udfff ok"])
def test_a_query_holding_a_lone_surrogate_is_a_value_error(index_dir: Path, encoder: PIEEncoder, no_encoding: None,
                                                          query: str) -> None:
    r = Retriever.from_index(index_dir, encoder=encoder)
    with pytest.raises(ValueError, match=r"query 0 \(.*\) is not valid UTF-8 text"):
        r.get_demos(query)
    with pytest.raises(ValueError, match=r"query 1 \(.*\) is not valid UTF-8 text"):
        r.get_demos_batch(["fine", query])


def test_a_pool_holding_a_lone_surrogate_fails_before_any_model(tmp_path: Path, index_dir: Path, encoder: PIEEncoder,
                                                               no_encoding: None) -> None:
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"instruction": "fine"}\n{"instruction": "half an emoji \\ud83d"}\n', encoding="utf-8")
    with pytest.raises(PoolError, match=r"pool\.jsonl:2: field 'instruction' is not valid UTF-8 text"):
        build_index(pool, tmp_path / "x", encoder=encoder)
    with pytest.raises(PoolError, match=r"record 1: field 'output'"):
        Retriever.from_index(index_dir, encoder=encoder).add([{"instruction": "ok", "output": "\udcc3"}])
    assert len(Retriever.from_index(index_dir, encoder=encoder)) == len(POOL)


def test_cli_arguments_must_be_utf8(tmp_path: Path, index_dir: Path, encoder: PIEEncoder,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["query", str(index_dir), "caf\udce9"], ["info", str(tmp_path / "\udcff")],
                 ["remove", str(index_dir), "--ids", "p1", "\ud800"], ["query", str(index_dir), "x", "--demo-format", "\udcff"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("icl-retriever: error: argument ") and err.count("\n") == 1, err
        assert "is not valid UTF-8 text" in err and "\\udc" not in err.split("(")[0]
    assert len(Retriever.from_index(index_dir, encoder=encoder)) == len(POOL)  # nothing was removed


def test_non_utf8_bytes_on_a_real_command_line(tmp_path: Path) -> None:
    """The shell hands Python bytes; Python turns an invalid one into a lone surrogate (\\udcff)."""
    done = subprocess.run([sys.executable, "-m", "icl_retriever.cli", "info", os.fsencode(tmp_path) + b"/caf\xe9"],
                          capture_output=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.decode() == "icl-retriever: error: argument index is not valid UTF-8 text (byte 0xe9: a " \
                                   "truncated emoji or a mis-decoded byte?)\n"


def test_a_manifest_string_holding_a_lone_surrogate(tmp_path: Path, index_dir: Path) -> None:
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["encoder"]["template"] = "{instruction} \ud800"
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match=r"manifest\.json: the manifest at encoder\.template is not valid UTF-8 text"):
        Retriever.from_index(copy)


# terminal output ------------------------------------------------------------------------------


def test_query_and_info_escape_control_characters(index_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", str(index_dir), "Write a poem about the moon.", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert not any(e in out for e in ESCAPES), out
    for shown in (r"sea.\x1b]0;pwned\x07", r"\x1b[31mWaves\x1b[0m", r"(poem\x1b[2J)", r"German.\u202e", r"thanks\x9b"):
        assert shown in out
    assert main(["query", str(index_dir), "Write a poem about the moon.", "-k", "1", "--json"]) == 0
    raw = capsys.readouterr().out
    assert "\x1b" not in raw and json.loads(raw)[0]["output"] == "\x1b[31mWaves\x1b[0m"  # JSON escapes, losslessly

    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["encoder"]["model"] = "evil\x1b]0;pwned\x07\x1b[2J"
    manifest["library_version"] = "1\x1b[31m"
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert main(["info", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and r"evil\x1b]0;pwned\x07\x1b[2J" in out and r"1\x1b[31m" in out
    # error messages are escaped too (the model name is in the one-line error)
    assert main(["query", str(copy), "Write a poem."]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1 and r"evil\x1b]0;pwned" in err
