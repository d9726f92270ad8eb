"""tsvmerge: model merging with Task Singular Vectors, as a streamed, batched engine."""
__version__ = "0.1.0"

from .api import Update, apply, merge, update  # noqa: E402
from .convert import convert  # noqa: E402
from .io import InputError  # noqa: E402
from .methods import METHODS  # noqa: E402
from .sti import interference  # noqa: E402
from .tsvc import compress, decompress  # noqa: E402

__all__ = ["merge", "update", "apply", "Update", "compress", "decompress", "interference", "convert", "InputError",
           "METHODS", "__version__"]
