"""Plumbing of foldstream: Kafka consumers, the RocksDB state store, publishing, metrics, CLI."""
