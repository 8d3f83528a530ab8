"""LoRA training benchmark: `python bench/gpu_training.py [...]` is `python -m bench.training [...]`.

The benchmark is the small package bench/training/ (models, measure, CLI); see its docstring and
bench/README.md, "LoRA training".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.training.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
