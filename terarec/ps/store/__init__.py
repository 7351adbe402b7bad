"""Slot stores: what a table group trains through. The ``SlotStore`` protocol
(``protocol``), the flat store of unbounded tables (``flat``), the tier chain of a
tiered table (``chain``), a group of tiered tables (``tiered``), and the one factory
that builds them from table configs (``factory``)."""
