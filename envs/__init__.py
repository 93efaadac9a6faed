"""PettingZoo environments whose agents are the workers of an agentnet network."""
