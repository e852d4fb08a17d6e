"""kdsearch: find the best small student for a knowledge-distillation job.

    python -m kdsearch run-study                  # the default study (studies/digits.toml)
    python -m kdsearch run-study studies/mnist.toml --data-dir ../shared/data
    python -m kdsearch report --study-name digits
"""

import logging

__version__ = "0.1.0"

# A CUDA build of torch on a machine without a GPU warns about CUDA_HOME when torch.utils.benchmark loads.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


class KdsearchError(Exception):
    """An error the user can fix: the message names what is wrong and how to fix it."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
