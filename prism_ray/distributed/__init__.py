"""Distributed adapters: the only modules that import `ray` and `deepspeed` (imported on use, never here)."""
