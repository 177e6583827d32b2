"""The model: what a user builds and reads (tasks, graphs, nodes, options, states, runs, errors)."""
