"""The dynamic batcher for one-shot work (/predict): BatchCollector."""
