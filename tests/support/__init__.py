"""Test support: real servers and real worker processes for the test suite."""
