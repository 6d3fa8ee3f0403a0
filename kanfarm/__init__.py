"""kanfarm: batch benchmarking of Kolmogorov-Arnold Networks against MLPs."""
__version__ = "0.1.0"
