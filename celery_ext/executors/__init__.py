"""Executors: the code that runs a task of a given type (see ``base.Executor``)."""
