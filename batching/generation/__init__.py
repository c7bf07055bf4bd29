"""The generation engine: token-level continuous batching over KV-cache slots.

Read in this order: engine.py (the loop), scheduler.py (who waits), slots.py (who holds which
slot), kv_cache.py (where K/V is written), model_runner.py (the forward passes), sampling.py,
detokenizer.py; request.py, handle.py and outbox.py carry one request's state and results.
"""
