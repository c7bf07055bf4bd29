"""The generation engine: token-level continuous batching over paged KV memory.

Read in this order: engine.py (the loop), scheduler.py (who waits), running_batch.py (what one
step does, preemption included), placement.py (admitted requests into rows), slots.py (batch
rows), block_manager.py (which KV blocks each sequence holds; the prefix cache), kv_cache.py
(where K/V is written and gathered), memory.py (how big the pool is), model_runner.py (the
forward passes), mixed_attention.py (prefill and decode in one forward), buckets.py,
decode_buffers.py and cuda_graphs.py (the static decode step), chunk_sizing.py (how much a step
prefills), choosing.py, sampling.py, logprobs.py, grammar.py (grammar_compiler.py and
grammar_worker.py compile them off the engine thread), detokenizer.py; request.py,
handle.py, outbox.py, submission.py and observer.py carry one request's state, results, checks
and metrics.
"""
