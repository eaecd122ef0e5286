"""One module per command: each reads and verifies its inputs (config, run directory, user
files), calls the core, writes its artifacts through run_dir, and returns a frozen, typed
result (results.py)."""
