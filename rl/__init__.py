"""rl: controller, algorithms, learner, weight sync, logging."""
