"""Data builders: each turns a task into tokenized samples of a requested number of segments."""
