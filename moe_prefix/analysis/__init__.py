"""Analysis: statistics, routing statistics, bank geometry, attention probes and the run report."""
