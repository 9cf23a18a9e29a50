"""Developer tooling beside the product (never packaged): tools/gpu_check is the GPU check of a lent session."""
