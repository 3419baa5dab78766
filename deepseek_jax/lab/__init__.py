"""What-if studies of the hardware the paper asks vendors for ("Insights" §3-6): change the hardware
in software (accumulator width, wire formats, bandwidth and latency, topology) and see what it buys.
Each study is one command, `python -m deepseek_jax.lab STUDY`, printing a table and writing a plot.
"""
