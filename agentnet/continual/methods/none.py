"""``none``: plain fine-tuning, task after task (the lower bound)."""

from agentnet.continual.methods import CL_METHODS, CLMethod


@CL_METHODS.register("none")
class FineTuning(CLMethod):
    """No protection against forgetting."""
