"""Developer tools: ``python -m vitkern.tools.kernel_report`` (registers, spills and shared memory per kernel)."""
