"""``python -m daal_triton.train`` = ``daal-train``."""
import sys

from .console import train

sys.exit(train())
