"""Runtime: engine, session, sampler, KV cache, tokenizer."""
