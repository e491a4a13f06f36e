"""The storage contract suite runs every test on each backend: sqlite, postgresql, mysql, mongodb."""

from tests.support.mongo import mongo_server  # noqa: F401 - fixture
from tests.support.storage import backend, storage  # noqa: F401 - fixtures
