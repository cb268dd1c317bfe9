"""The training components: setup, the step, the checkpointer, the logger, config drift."""
