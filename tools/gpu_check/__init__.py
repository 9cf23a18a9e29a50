"""The GPU check of a lent device session (bench/GPU_CHECK.md): staging, the device-time plan, the stages."""
