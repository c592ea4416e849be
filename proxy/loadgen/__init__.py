"""Open-loop load generation against Ollama-compatible targets on loopback: workloads, the dispatcher,
summaries and the seed SLOs."""
