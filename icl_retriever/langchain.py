"""``icl_retriever.langchain``: the LangChain components, kept importable here; they live in
:mod:`icl_retriever.integrations.langchain` beside the other integrations."""

from icl_retriever.integrations.langchain import (
    PIEExampleSelector,
    PIERetriever,
    check_search_kwargs,
    demo_to_document,
    demo_to_example,
)

__all__ = ["PIEExampleSelector", "PIERetriever", "check_search_kwargs", "demo_to_document", "demo_to_example"]
