"""The permission-scoped LMDB response cache."""
