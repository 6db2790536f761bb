"""The defaults of ``qkcore plan``'s options, in a module without torch (the command line reads them to parse)."""

from __future__ import annotations

#: Documents assumed for a Hub dataset when ``dataset.max_samples`` is null and no ``--documents`` is given.
DEFAULT_DOCUMENTS = 500
#: Local documents tokenised to measure lengths; a larger dataset is sampled evenly and scaled.
LENGTH_SAMPLE = 1000
