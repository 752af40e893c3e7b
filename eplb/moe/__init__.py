"""MoE adapters and the EPLB expert layer."""
