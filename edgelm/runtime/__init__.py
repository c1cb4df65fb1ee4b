"""Runtime: engine, session, sampler, KV cache (the tokenizer is `edgelm.tokenizer`)."""
