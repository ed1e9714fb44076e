"""The DuckDB system of record (docs/DESIGN.md §3-4). The Python read API: ``from mel_core.store import open_reader``."""

from mel_core.store.reader import StoreReader, open_reader

__all__ = ["StoreReader", "open_reader"]
