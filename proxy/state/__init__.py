"""Shared state of the chain: token buckets and concurrency leases, in this process or in Redis."""
