"""Helpers shared by the test packages (a hypervisor server in a subprocess, ...)."""
