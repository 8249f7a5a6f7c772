"""Adapters to other frameworks: LangChain (:mod:`.langchain`, also importable as ``icl_retriever.langchain``;
langchain-core is a dependency) and DSPy (:mod:`.dspy`, ``pip install "icl-retriever[dspy]"``, imported only
when used)."""
