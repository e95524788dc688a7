"""Runners, latency / memory / accuracy measurement and report rendering."""
