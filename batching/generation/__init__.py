"""The generation engine: token-level continuous batching over paged KV memory.

Read in this order. A step is schedule -> run -> postprocess:

* config.py: EngineConfig, every setting of the engine (built from Settings by the service);
* engine.py: the loop, and the one place a step is put together;
* scheduler.py: who waits (the queue), which rows are held (SlotTable), and each step's plan
  as data (StepPlanner.schedule -> StepPlan: retire, preempt, admit, the prefill chunks);
* running_batch.py: running a plan: its forwards (prefill, decode or both in one), sampling,
  and applying the results (tokens to the handles, first tokens, ended rows retired);
* block_manager.py: which KV blocks each sequence holds, and the prefix cache over them;
* kv_cache.py: the KV pool: how big it is, where K/V is written and gathered;
* model_runner.py: the forward passes;
* static_decode.py: the decode step's buckets, static buffers and CUDA graphs;
* attention.py: attention over the KV blocks: a mask per layer kind (full, sliding, chunked),
  prefill and decode in one forward (mixed steps), and the decode step reading blocks in place;
* chunk_sizing.py: how much a step may prefill;
* sampling.py: choosing tokens (SamplingParams, the sampler, logprobs, grammar masks, one
  step's choice);
* grammar.py: structured output: grammars compiled under limits (in a worker process of its
  own), and each request's matcher;
* detokenizer.py: token ids to final text, stop strings;
* request.py: what submit() refuses at once, and one request's state;
* handle.py: one request's result channel (the caller's handle and the engine's outbox);
* observer.py: the metric hooks;
* model_support.py: which models are served, how, and refusals; the warm-up checks of the
  engine's paths against the model's own forward.
"""
