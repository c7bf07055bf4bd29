"""/generate: the generation service (engine + tokenizer), its one submit path, its route."""
