"""The engine: the scheduler loop that drives an executor through the policies."""
