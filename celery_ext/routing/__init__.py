"""Routing: which queue a task is published to."""
