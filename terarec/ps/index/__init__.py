"""Key -> slot maps: the host tier's dense index (``hash_index``), the caches' key map
with deletes (``key_map``) and their triton kernels (``triton_hash``)."""
