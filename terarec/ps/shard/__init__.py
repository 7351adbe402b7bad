"""Sharded tables: the all-to-all exchange of keys and rows between ranks (``exchange``)
and the lookup that sends each pair to its owner rank (``sharded``)."""
