"""terarec: CTR training with embedding tables larger than GPU memory."""

import logging as _logging

__version__ = "0.1.0"

# torchrec's KeyedJaggedTensor asks torch.fx whether it is tracing, and torch answers
# every process with a deprecation note meant for torchrec's developers (not for users of
# terarec, in its CLI or in their own training loop): keep it out of their logs.
_logging.getLogger("torch.fx._symbolic_trace").setLevel(_logging.ERROR)
