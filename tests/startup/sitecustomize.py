"""Run at start-up by every Python that the tests start (conftest.py puts this folder and tests/
on PYTHONPATH): see torchvision_without_ops."""
import torchvision_without_ops

torchvision_without_ops.install()
