from tests.support.server import secure_server  # noqa: F401
