"""The offline toy world: a generated arithmetic task, a local tokenizer and three model families."""
