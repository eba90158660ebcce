from tests.support.server import server  # noqa: F401
