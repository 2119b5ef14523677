"""`make bench`: throughput, latency and footprint of crm-syncd against the stand-in Citadel."""
