"""System tests: a real systemd booted in a systemd-nspawn container (needs root)."""
