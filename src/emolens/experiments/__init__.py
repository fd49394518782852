"""Behavioural experiments: sandboxed coding tasks, reward-hacking grades."""
