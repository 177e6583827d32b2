"""Executors: where calls run (in-process, a process pool with its workers, a dask cluster)."""
