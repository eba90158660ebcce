from tests.support.server import secure_server, server  # noqa: F401
