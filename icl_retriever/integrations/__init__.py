"""Adapters to other frameworks. Each imports its framework only when used; install the extra
(``pip install "icl-retriever[dspy]"``). LangChain's lives in :mod:`icl_retriever.langchain`."""
