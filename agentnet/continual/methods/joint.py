"""``joint``: each stage trains on the union of all tasks seen so far (cumulative; the upper bound).

With the same steps per stage as the other methods, the final stage is joint training on every task.
"""

from agentnet.continual.methods import CL_METHODS, CLMethod


@CL_METHODS.register("joint")
class JointTraining(CLMethod):
    """Cumulative replay of every earlier task's full data."""

    def stage_tasks(self, stream, index: int) -> list:
        return list(stream.tasks[: index + 1])
