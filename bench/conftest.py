"""Lets the pytest-benchmark files import the helpers in bench/kernels.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
