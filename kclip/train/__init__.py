"""The training program of Knowledge-CLIP: flags (params), learning-rate schedule, checkpoints and the loop."""
