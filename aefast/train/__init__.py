"""`aefast train MODEL`: configuration (config.py), the loop with checkpoints and exact
resumption (loop.py), the final evaluation (evaluate.py) and figures (figures.py);
`python -m aefast.train.table` trains every model and prints the README's table."""

from aefast.train.config import MODEL_NAMES, MODELS, resolve
from aefast.train.loop import train

__all__ = ["MODELS", "MODEL_NAMES", "resolve", "train"]
