"""The generation engine: token-level continuous batching over paged KV memory.

Read in this order. A step is schedule -> run -> postprocess:

* config.py: EngineConfig, every setting of the engine (built from Settings by the service);
* engine.py: the loop, and the one place a step is put together;
* scheduler.py: who waits, and who is admitted next;
* running_batch.py: what one step does (prefill, decode or both, preemption included);
* slots.py: batch rows (who holds which row) and how an admitted request gets one;
* block_manager.py: which KV blocks each sequence holds, and the prefix cache over them;
* kv_cache.py: the KV pool: how big it is, where K/V is written and gathered;
* model_runner.py: the forward passes;
* static_decode.py: the decode step's buckets, static buffers and CUDA graphs;
* attention.py: attention over the KV blocks: a mask per layer kind (full, sliding, chunked),
  prefill and decode in one forward (mixed steps), and the decode step reading blocks in place;
* chunk_sizing.py: how much a step may prefill;
* sampling.py: choosing tokens (SamplingParams, the sampler, logprobs, one step's choice);
* grammar.py: grammar masks (grammar_compiler.py and grammar_worker.py compile grammars off
  the engine thread, the worker in a process of its own);
* detokenizer.py: token ids to final text, stop strings;
* request.py: one request's state; submission.py: what submit() refuses at once;
* handle.py: one request's result channel (the caller's handle and the engine's outbox);
* observer.py: the metric hooks;
* model_support.py: which models are served, how, and refusals; path_checks.py: warm-up checks
  of the engine's paths against the model's own forward.
"""
