"""Replay: which earlier rows may be replayed (policies), how many per step (rates and
budgets), and which rows make the batch of (task, step) (the sampler), all pure functions
of the seed, the task, the step and the replay pool."""
