"""Real-size bundles for ``polymorphd bench --realsize DIR``: DeiT-Tiny geometry, random weights (needs torch).

    .venv/bin/python bench/realsize.py --like /work/bundles/pre_s0 --out /work/out12/realsize [--fp16]

See ``polymorphd.export.realsize`` and bench/README.md ("Real size").
"""

from __future__ import annotations

import sys

from polymorphd.export.realsize import main

if __name__ == "__main__":
    sys.exit(main())
