"""Reports on DCQ runs: the Table-1 reproduction (``reproduce``), running compress_classifier.py and
reading its logs (``runs``), the packaged schedules (``schedules``), kernel diagnostics (``kernels``)."""
