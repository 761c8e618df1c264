"""The run engine: one training loop (``trainer``) behind one training path (``fit``), used in
process, by the fan-out of independent trainings (``jobs``, with their cache ``job_cache``) and by
every command's driver (``driver``: output directory, lock, data fingerprint, logging, provenance).
"""
