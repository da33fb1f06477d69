"""segue: a fault-tolerant distributed LLM serving framework."""

__version__ = "0.1.0"
