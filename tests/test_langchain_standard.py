"""LangChain's own standard retriever test suite (langchain-tests), run against PIERetriever."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.retrievers import BaseRetriever
from langchain_tests.integration_tests import RetrieversIntegrationTests

from icl_retriever import PIEEncoder, Retriever, build_index, load_pool
from icl_retriever.langchain import PIERetriever

from conftest import DEFAULT_POOL

# The suite's async test is unmarked; anyio's plugin runs it (on asyncio) and leaves sync tests alone.
pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def standard_retriever(tmp_path_factory: pytest.TempPathFactory, encoder: PIEEncoder) -> Retriever:
    """The default pool built into an index directory of its own, opened from disk."""
    out = tmp_path_factory.mktemp("langchain-standard") / "index"
    build_index(DEFAULT_POOL, out, encoder=encoder)
    return Retriever.from_index(out, encoder=encoder)


class TestPIERetrieverStandard(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _index(self, standard_retriever: Retriever) -> None:
        # The suite reads its constructor parameters from properties; hand them the module's index.
        self._retriever = standard_retriever

    @property
    def retriever_constructor(self) -> type[BaseRetriever]:
        return PIERetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"retriever": self._retriever, "k": 4}

    @property
    def retriever_query_example(self) -> str:
        return "Translate 'good night' into German."


def test_standard_index_is_on_disk(standard_retriever: Retriever) -> None:
    assert isinstance(standard_retriever.path, Path) and standard_retriever.path.is_dir()
    assert len(standard_retriever) == len(load_pool(DEFAULT_POOL))
