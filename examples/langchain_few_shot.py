"""Few-shot prompts with LangChain, demonstrations picked by task (runs offline on the default pool).

    python examples/langchain_few_shot.py

The selector embeds examples/demos.jsonl in memory with the embedded PIE model. With an index built
by ``icl-retriever build examples/demos.jsonl --out indexes/default``, open that instead:
``PIEExampleSelector.from_index("indexes/default", k=2)``.
"""

from __future__ import annotations

from pathlib import Path

from langchain_core.prompts import FewShotPromptTemplate, PromptTemplate

from icl_retriever.langchain import PIEExampleSelector, PIERetriever

POOL = Path(__file__).resolve().parent / "demos.jsonl"

QUERIES = [
    "Translate 'good night' into German.",
    "Write a limerick about a cat who loves lasagna.",
]


def main() -> None:
    # The one line that differs from LangChain's own selector:
    #   SemanticSimilarityExampleSelector.from_examples(examples, embeddings, FAISS, k=2)
    selector = PIEExampleSelector.from_examples(POOL, k=2)

    prompt = FewShotPromptTemplate(
        example_selector=selector,
        example_prompt=PromptTemplate.from_template("Instruction: {instruction}\nInput: {input}\nOutput: {output}"),
        prefix="Complete the last instruction the way the examples complete theirs.",
        suffix="Instruction: {query}\nOutput:",
        input_variables=["query"],
    )
    for query in QUERIES:
        tasks = [example["task"] for example in selector.select_examples({"query": query})]
        print(f"=== {query}  (demos: {', '.join(tasks)})")
        print(prompt.format(query=query))
        print()

    # The same index as a LangChain retriever: Documents with the demo in page_content and metadata.
    retriever = PIERetriever(retriever=selector.retriever, k=2)
    print("=== PIERetriever.batch")
    for query, docs in zip(QUERIES, retriever.batch(QUERIES), strict=True):
        print(query)
        for doc in docs:
            print(f"  {doc.metadata['score']:.3f}  {doc.id:<22} {doc.metadata['task']}")


if __name__ == "__main__":
    main()
