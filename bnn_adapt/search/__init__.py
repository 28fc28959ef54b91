"""The size-vs-accuracy search: its storages, the sweeper's hooks, trial owners, pruning and the Pareto front."""
