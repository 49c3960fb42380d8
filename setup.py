#!/usr/bin/env python
"""For detectron2-style habits (`python setup.py develop`); the metadata lives in pyproject.toml."""
from setuptools import setup

setup()
