"""rollout: vLLM engine actors, env actor pools and the episode runner."""
