"""Benchmarks of macl_kernels against naive PyTorch, torch.compile and the losses users have today.

    python -m benchmarks.sweep        # CSV, one row per case (benchmarks/results/sweep.csv)
    python -m benchmarks.plot         # PNGs into docs/
    python -m benchmarks.readiness    # GPU readiness report (AOT compile + H100 roofline), no GPU needed
    pytest benchmarks/ --benchmark-only

See benchmarks/README.md.
"""
