"""Tiers: where rows are stored. The ``Tier`` and ``Cache`` protocols (``protocol``), the
unbounded host tier (``host``), the slot cache of the device and budgeted host tiers
(``cache``), the scratch pad (``scratch``) and the SSD tier on RocksDB (``ssd``)."""
