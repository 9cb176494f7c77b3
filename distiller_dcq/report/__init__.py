"""Reports on DCQ runs: kernel diagnostics."""
