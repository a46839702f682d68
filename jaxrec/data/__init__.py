"""Data: sources and processing (`pipeline`), the data types and
deterministic batching (`sequences`), and the embedded generator
(`synthetic`)."""
