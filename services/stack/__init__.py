"""The embedded local stack: Kafka (KRaft, single node), Redis and SeaweedFS (S3), run as detached
processes under ``<data_dir>`` and tracked by pid files, on the ports from Settings.

    await install(settings)   # apt/Maven/venv checks; fast when done
    await up(settings)        # start what is not running, wait for real health
    await status(settings)    # {"kafka": {"pid": ..., "alive": ..., "address": ...}, ...}
    await down(settings)
"""

from services.stack._install import install
from services.stack._layout import COMPONENTS, StackError
from services.stack._supervisor import down, gone, logs, start_component, status, stop_component, up

__all__ = [
    "COMPONENTS",
    "StackError",
    "down",
    "gone",
    "install",
    "logs",
    "start_component",
    "status",
    "stop_component",
    "up",
]
