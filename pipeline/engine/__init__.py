"""The engine: PTI and its baselines as pure tensor functions, the models, prompts, metrics and
the stored form. No Ray, no storage: it runs in any process."""
