"""``antidistill serve``: an OpenAI-compatible server whose completions are antidistillation-sampled."""
