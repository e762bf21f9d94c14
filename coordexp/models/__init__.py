"""Models: the tiny local model factory (random Qwen2/Qwen3/Qwen-VL architectures with the 1000 coordinate
tokens) and coordinate-token setup for real checkpoints. Importing the package imports nothing heavy."""
