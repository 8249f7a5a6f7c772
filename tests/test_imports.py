import icl_retriever


def test_all_lists_the_public_api() -> None:
    assert set(icl_retriever.__all__) >= {"Demo", "PIEEncoder", "Retriever", "build_index"}
    for name in icl_retriever.__all__:
        assert hasattr(icl_retriever, name), name
