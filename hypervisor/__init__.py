"""The hypervisor: the sans-I/O model of Xen (`core`) and its gRPC adapter (`server`)."""
