"""Where a measurement happens. One registry: a device URL's scheme picks the class."""

from edgeprune.devices import local  # noqa: F401  (registers "local")
from edgeprune.devices.base import Device, get_device, host_arch

__all__ = ["Device", "get_device", "host_arch"]
