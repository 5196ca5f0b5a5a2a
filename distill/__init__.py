"""distill: teacher -> student -> adapted student, with an honest bill of what it cost."""

__version__ = "0.1.0"
