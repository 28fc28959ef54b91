"""Running an experiment: the task function, one builder per object, the config, results and resume."""
