"""``python -m daal_triton.train`` = ``daal-train``."""
import sys

from .cli import main

sys.exit(main())
