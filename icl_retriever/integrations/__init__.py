"""Adapters to other frameworks: LangChain (:mod:`.langchain`, also importable as ``icl_retriever.langchain``;
langchain-core is a dependency), DSPy (:mod:`.dspy`, ``pip install "icl-retriever[dspy]"``), LlamaIndex
(:mod:`.llama_index`, ``pip install "icl-retriever[llamaindex]"``) and Haystack (:mod:`.haystack`,
``pip install "icl-retriever[haystack]"``). The optional ones are imported only when used."""
