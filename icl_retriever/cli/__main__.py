"""``python -m icl_retriever.cli``: the ``icl-retriever`` command."""

import sys

from icl_retriever.cli import main

sys.exit(main())
