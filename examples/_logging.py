"""Quiet one library notice the examples that import accelerate would otherwise print."""

from __future__ import annotations

import logging

__all__ = ["quiet_deepspeed_cpu_notice"]


class _NoDeepSpeedCpuNotice(logging.Filter):
    """Drops one message: accelerate imports DeepSpeed whenever it is installed (``unwrap_model`` looks for
    its engine), and on a machine without a GPU DeepSpeed then warns "Setting accelerator to CPU" on its
    ``DeepSpeed`` logger. The examples using this do not use DeepSpeed; every other message of that logger stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def quiet_deepspeed_cpu_notice() -> None:
    """Install ``_NoDeepSpeedCpuNotice`` on the ``DeepSpeed`` logger, once (before DeepSpeed is imported or after)."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _NoDeepSpeedCpuNotice) for f in logger.filters):
        logger.addFilter(_NoDeepSpeedCpuNotice())
