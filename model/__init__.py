"""convserve model package: architectures, preprocessing and the checkpoint format.

The one source of truth that training and serving both import.
"""
