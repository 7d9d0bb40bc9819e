"""dreamdata diffusion core: class-conditional UNet, noise schedules, samplers, checkpoints.

Imports only torch (and safetensors for checkpoints); no CLI, no globals, no I/O beyond
checkpoint directories.
"""
